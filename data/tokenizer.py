"""Byte-level BPE: training, caching, loading, and encoding documents with character offsets.

The trained tokenizer is GPT-2 style: ByteLevel pre-tokenizer (its regex splits words, numbers,
punctuation and whitespace runs; a space is glued to the front of the following word), BPE model
without normalizer, ByteLevel decoder, one special token `<|endoftext|>` (end of document). It is
trained with `tokenizers` on the training split only and cached in
`<cache_dir>/tokenizers/bpe-<vocab>-<hash of the training text>.json`; training is deterministic,
so the same text and vocabulary size always give the same file. `data.tokenizer.path` loads a
given `tokenizer.json` instead; it must contain the end-of-document token.

Encoding never interprets `<|endoftext|>` written inside a document as the special token
(`encode_special_tokens=True`): only the packer inserts end-of-document ids.

Long documents are encoded in chunks cut just before a newline that follows a printable ASCII
character. At such a point the ByteLevel regex always ends a pre-token (no alternative spans a
non-space character and a newline) and BPE never merges across pre-tokens, so the ids are exactly
those of encoding the whole document at once (a test checks this) while avoiding the
superlinear cost `tokenizers` shows on multi-megabyte strings. Chunking is only used for
tokenizers with this exact structure; any other tokenizer.json encodes whole documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bipe.errors import DataError
from bipe.io import atomic_write_text

log = logging.getLogger(__name__)

TOKENIZER_VERSION = 1  # bump when training settings change: part of the cache keys
EOD_TOKEN = "<|endoftext|>"
CHUNK_CHARS = 32_768
_SAFE_CUT = re.compile(r"(?<=[!-~])\n")  # a newline right after printable, non-space ASCII
ENCODE_BATCH = 512  # chunks per encode_batch call: bounds memory of Encoding objects


def train_bpe(texts: Iterable[str], vocab_size: int, eod_token: str = EOD_TOKEN) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (incl. `eod_token`) on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def text_hash(texts: Iterable[str]) -> str:
    """Hash of a sequence of documents (length-prefixed, so boundaries matter)."""
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def file_hash(path: str | os.PathLike[str]) -> str:
    """blake2b of a file's bytes (identity of a user-given tokenizer.json)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_path_or_error(path: str) -> Path:
    """`data.tokenizer.path` as a Path; DataError naming it when missing."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise DataError(f"data.tokenizer.path={path!r}: no such file (a tokenizer.json)")
    return p


def load_tokenizer_file(path: str | os.PathLike[str],
                        key: str = "data.tokenizer.path") -> Tokenizer:
    """Tokenizer.from_file with a DataError naming `key` on a broken file."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise DataError(f"{key}={str(path)!r} is not a valid tokenizer.json: {e}") from e


def train_or_load_cached(texts: Sequence[str], vocab_size: int, cache_root: str,
                         eod_token: str = EOD_TOKEN) -> Tokenizer:
    """The BPE for these training texts from the tokenizer cache, training it on a miss."""
    key = text_hash(texts)
    folder = Path(cache_root) / "tokenizers"
    path = folder / f"bpe-v{TOKENIZER_VERSION}-{vocab_size}-{key}.json"
    checksum = path.with_name(path.name + ".blake2b")  # the JSON's hash, written after it
    if path.is_file():
        why = "its checksum file is missing"
        try:
            if checksum.is_file():
                why = "its bytes do not match its checksum (edited or damaged)"
                if checksum.read_text(encoding="ascii").strip() == file_hash(path):
                    tok = Tokenizer.from_file(str(path))
                    why = f"it lacks the end-of-document token {eod_token!r}"
                    if tok.token_to_id(eod_token) is not None:
                        log.info("reusing tokenizer %s", path)
                        return tok
        except Exception as e:  # a corrupt cached tokenizer is retrained, not fatal
            why = f"it is unreadable ({e})"
        log.warning("cached tokenizer %s is not used: %s; retraining", path, why)
    log.info("training byte-level BPE (vocab %d) on %d documents", vocab_size, len(texts))
    tok = train_bpe(texts, vocab_size, eod_token)
    atomic_write_text(path, tok.to_str())
    atomic_write_text(checksum, file_hash(path) + "\n")
    return tok


def eod_id_of(tok: Tokenizer, eod_token: str, source: str) -> int:
    """Id of the end-of-document token; DataError naming `source` if the vocabulary lacks it."""
    eod = tok.token_to_id(eod_token)
    if eod is None:
        raise DataError(
            f"{source} has no end-of-document token {eod_token!r}; add it as a special token "
            "or set data.tokenizer.eod_token to one it has"
        )
    return int(eod)


def chunk_safe(tok: Tokenizer) -> bool:
    """True when `tok` is a plain ByteLevel(regex) BPE, so chunking at safe newlines is exact."""
    spec: dict[str, Any] = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and bool(pre.get("use_regex", True))
        and not pre.get("add_prefix_space", False)
        and (spec.get("model") or {}).get("type") == "BPE"
    )


def chunk_starts(text: str, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """Start offsets of chunks of ~`chunk_chars`, cut only at safe newlines (first is 0)."""
    if len(text) <= chunk_chars:
        return [0]
    starts = [0]
    for m in _SAFE_CUT.finditer(text):
        if m.start() - starts[-1] >= chunk_chars:
            starts.append(m.start())
    return starts


class DocumentEncoder:
    """Encodes documents to (ids uint32 [n], token start char offsets int64 [n])."""

    def __init__(self, tok: Tokenizer, chunk_chars: int = CHUNK_CHARS) -> None:
        self.tok = Tokenizer.from_str(tok.to_str())  # private copy: we change a runtime flag
        self.tok.encode_special_tokens = True
        self.chunk_chars = chunk_chars if chunk_safe(tok) else 0

    def encode_many(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encode each text; tokens are identical to encoding the whole text in one call."""
        pieces: list[tuple[int, int, str]] = []  # (document index, char offset, text)
        for i, text in enumerate(texts):
            cuts = chunk_starts(text, self.chunk_chars) if self.chunk_chars else [0]
            ends = cuts[1:] + [len(text)]
            pieces.extend((i, a, text[a:b]) for a, b in zip(cuts, ends, strict=True))
        ids: list[list[np.ndarray]] = [[] for _ in texts]
        starts: list[list[np.ndarray]] = [[] for _ in texts]
        for j in range(0, len(pieces), ENCODE_BATCH):
            group = pieces[j : j + ENCODE_BATCH]
            encodings = self.tok.encode_batch([p[2] for p in group], add_special_tokens=False)
            for (i, offset, _), enc in zip(group, encodings, strict=True):
                ids[i].append(np.asarray(enc.ids, dtype=np.uint32))
                off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                starts[i].append(off[:, 0] + offset)
        out = []
        for a, s in zip(ids, starts, strict=True):
            out.append((
                np.concatenate(a) if a else np.zeros(0, np.uint32),
                np.concatenate(s) if s else np.zeros(0, np.int64),
            ))
        return out
