"""Atomic file writes: a file is either its old self or completely new, never half written.

Every file this project writes that something later reads (checkpoints, saved models, caches,
results, tuned settings) goes through `atomic_write`: the content goes to a hidden temporary
file in the same folder, is flushed and fsynced, then `os.replace`d over the target (atomic on
POSIX and Windows), and the folder is fsynced so the rename survives a crash. A failure (a full
disk, a read-only folder, Ctrl-C) removes the temporary file and leaves the target untouched.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder so a rename or creation inside it survives a crash (POSIX; else no-op)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(f)` on a temporary binary file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _umask() -> int:
    try:  # Linux: read it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the fallback)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new uniquely named folder in `parent`, with the permissions `mkdir` would give it
    (`tempfile.mkdtemp` makes it 0700, which a cache a group shares cannot have once it is
    renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # what atomic_write leaves behind if killed


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files `atomic_write` left in `folder` when its process was killed
    (`.<name>.<pid>.tmp` whose process no longer runs); returns what was removed."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = _TEMP.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`text` (UTF-8) written atomically to `path`."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """`data` as indented JSON, written atomically to `path`."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
