"""Segmenters: which tokens of a document end a segment (`boundary[t] = True`).

A segmenter never changes tokens. Each document is tokenized once (ids + start character offset
of every token); the segmenter then decides boundaries on that fixed token sequence:

* `punkt` - NLTK Punkt sentences (pretrained English, see `data.punkt_data`), plus every newline
  when `data.newline_boundaries` is true (the default; the paper ends segments at full stops and
  newlines).
* `lines` - every newline ends a segment (code).
* `separators` - the released BiPE code's rule: a token is a boundary iff its id is in a set,
  the tokens of `data.separators` (default `"\\n"` and `" ."`, the LLaMA ids 13 and 869 of the
  released code). In our byte-level BPE `"\\n"` is one token (`Ċ`) but runs of newlines can merge
  (`ĊĊ`) and `"."` usually stands alone while `" ."` is rare, as in LLaMA. With
  `data.separator_match=exact` (default, the released rule) only tokens that decode to exactly
  a separator count; `contains` also counts every token whose text contains one (e.g. `ĊĊ`).
  Same result as `bipe.positions.boundaries_from_separators(ids, separator_ids)`.
* `fixed` - a boundary every `data.segment_length` tokens, counted from the document start.
* `none` - no boundaries inside documents (segments = documents).

Character spans -> tokens (punkt, lines). A segment ends after a character position `c` (a
"cut"). The boundary goes on the token that contains character `c - 1`, i.e. the last token whose
start offset is < `c` (`np.searchsorted(starts, c) - 1`); a token straddling the cut (a multi-byte
character split into several byte tokens, or a merged token) therefore ends the segment, so every
segment is non-empty and several cuts inside one token collapse into one boundary.

Whitespace between segments is attached deterministically: a sentence cut is moved to just after
the last newline of the whitespace run that follows the sentence, when that run contains a
newline; otherwise the cut stays after the sentence's last character and the following spaces
start the next segment (where byte-level BPE puts them anyway, glued to the next word as `Ġword`).
So `"stay?\\n\\nYes."` splits as `"stay?\\n\\n" | "Yes."`, `"stay? Yes."` as `"stay?" | " Yes."`,
and blank lines never form segments of their own. Newline cuts follow the same rule (one cut after
the last newline of each newline-containing whitespace run). In characters, indentation belongs to
the next line; but the byte-level pre-tokenizer glues a newline to the indentation after it
(`"\\n   "` + `" return"`), so when such a token straddles the cut it ends the segment and
carries the indentation with it; tokens are never split to move a boundary.

End of document: the packer appends the end-of-document token with boundary=True, which closes the
document's last segment; char-based segmenters clear the flag of the document's last content token
so that `"... Yes." <eod>` is one segment rather than leaving `<eod>` alone as a segment of one.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bipe.errors import ConfigError

from .config import DataConfig
from .punkt_data import load_punkt

SEGMENTER_VERSION = 1  # bump when boundary rules change: part of the packed cache key
_NEWLINE_RUN = re.compile(r"[^\S\n]*\n\s*")


def newline_runs(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Whitespace runs containing a newline: (run start char, cut after the run's last newline)."""
    starts: list[int] = []
    cuts: list[int] = []
    for m in _NEWLINE_RUN.finditer(text):
        starts.append(m.start())
        cuts.append(m.start() + m.group().rindex("\n") + 1)
    return np.asarray(starts, dtype=np.int64), np.asarray(cuts, dtype=np.int64)


def attach_whitespace(ends: np.ndarray, run_starts: np.ndarray, run_cuts: np.ndarray) -> np.ndarray:
    """Move each cut that starts a newline run to just after that run's last newline."""
    if len(run_starts) == 0 or len(ends) == 0:
        return ends
    idx = np.searchsorted(run_starts, ends)
    hit = idx < len(run_starts)
    hit[hit] = run_starts[idx[hit]] == ends[hit]
    out = ends.copy()
    out[hit] = run_cuts[idx[hit]]
    return out


def cuts_to_boundaries(cuts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """bool [n]: True on the token containing character `c - 1` for each cut `c`."""
    boundary = np.zeros(len(starts), dtype=bool)
    if len(starts) == 0 or len(cuts) == 0:
        return boundary
    tok = np.searchsorted(starts, cuts, side="left") - 1
    boundary[tok[tok >= 0]] = True
    return boundary


def separator_token_ids(tok: Tokenizer, separators: tuple[str, ...], match: str) -> np.ndarray:
    """Sorted int64 ids of the tokens that decode to (exact) / contain (contains) a separator."""
    special = {int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}
    found: list[int] = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        if i in special:
            continue
        s = tok.decode([i], skip_special_tokens=False)
        if (match == "exact" and s in separators) or (
            match == "contains" and any(sep in s for sep in separators)
        ):
            found.append(i)
    return np.asarray(sorted(found), dtype=np.int64)


def configured_separator_ids(tok: Tokenizer, cfg: DataConfig) -> np.ndarray:
    """`data.separator_ids` when given (the released code's LLaMA ids 13 and 869, whose texts
    cannot be matched since 869 decodes to "." on its own), else the tokens of `data.separators`."""
    if cfg.separator_ids is not None:
        ids = np.asarray(sorted(cfg.separator_ids), dtype=np.int64)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
            raise ConfigError(f"data.separator_ids={list(cfg.separator_ids)} has ids outside the "
                              f"tokenizer's vocabulary of {vocab}")
        return ids
    return separator_token_ids(tok, cfg.separators, cfg.separator_match)


class Segmenter:
    """Boundary flags for the content tokens of one document (end-of-document token excluded)."""

    def __init__(self, cfg: DataConfig, tok: Tokenizer) -> None:
        self.kind = cfg.segmenter
        self.cfg = cfg
        self._punkt: Any = None
        self.separator_ids = np.zeros(0, dtype=np.int64)
        if self.kind == "punkt":
            self._punkt = load_punkt(cfg.cache_root)
        elif self.kind == "separators":
            self.separator_ids = configured_separator_ids(tok, cfg)
            if len(self.separator_ids) == 0:
                raise ConfigError(
                    f"data.separators={list(cfg.separators)!r} match no token of the tokenizer "
                    f"(data.separator_match={cfg.separator_match}); try separator_match=contains"
                )

    @staticmethod
    def identity(cfg: DataConfig) -> dict[str, Any]:
        """The config that determines boundaries (for the cache key)."""
        out: dict[str, Any] = {"segmenter": cfg.segmenter, "version": SEGMENTER_VERSION}
        if cfg.segmenter == "punkt":
            out["newline_boundaries"] = cfg.newline_boundaries
            out["language"] = "english"
        elif cfg.segmenter == "separators":
            out["separators"] = list(cfg.separators)
            out["match"] = cfg.separator_match
            if cfg.separator_ids is not None:
                out["separator_ids"] = list(cfg.separator_ids)
        elif cfg.segmenter == "fixed":
            out["segment_length"] = cfg.segment_length
        return out

    def char_cuts(self, text: str) -> np.ndarray:
        """Sorted unique cut positions (exclusive segment ends, in characters) for punkt/lines."""
        run_starts, run_cuts = newline_runs(text)
        if self.kind == "lines":
            return run_cuts
        ends = np.asarray([e for _, e in self._punkt.span_tokenize(text)], dtype=np.int64)
        cuts = attach_whitespace(ends, run_starts, run_cuts)
        if self.cfg.newline_boundaries:
            cuts = np.concatenate([cuts, run_cuts])
        return np.unique(cuts)

    def boundaries(self, text: str, ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """bool [n] for the n content tokens (`ids`, `starts` from DocumentEncoder)."""
        n = len(ids)
        if self.kind == "none" or n == 0:
            return np.zeros(n, dtype=bool)
        if self.kind == "separators":
            return np.isin(ids, self.separator_ids)
        if self.kind == "fixed":
            return (np.arange(n) + 1) % self.cfg.segment_length == 0
        boundary = cuts_to_boundaries(self.char_cuts(text), starts)
        boundary[-1] = False  # the end-of-document token closes the last segment
        return boundary
