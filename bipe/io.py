"""Atomic file writes: a file is either its old self or completely new, never half written.

Every file this project writes that something later reads (checkpoints, saved models, caches,
results, tuned settings) goes through `atomic_write`: the content goes to a hidden temporary
file in the same folder, is flushed and fsynced, then `os.replace`d over the target (atomic on
POSIX and Windows), and the folder is fsynced so the rename survives a crash. A failure (a full
disk, a read-only folder, Ctrl-C) removes the temporary file and leaves the target untouched.

A folder of files that belong together (a saved model) goes through `replace_folder` the same
way: written into a hidden folder beside the target, then swapped in (one atomic exchange on
Linux), so a reader finds the old folder or the new one, never some files of each.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection
from functools import cache
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


def file_mode() -> int:
    """The permissions `open` gives a new file under the umask: what a file that a library wrote
    through a private temporary file (0600) should get before others are meant to read it."""
    return 0o666 & ~_umask()


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


# -- folders --------------------------------------------------------------------------------

_ACTIVE: set[Path] = set()  # this process's folders being written, which are not stale


def _folder_temp(target: Path) -> re.Pattern[str]:
    """What `replace_folder` names its new (`.new-`) and set-aside (`.old-`) folders."""
    return re.compile(rf"^\.{re.escape(target.name)}\.(?:new|old)-(\d+)-.+$")


@cache
def _renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not glibc/musl on Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False
    where the system or the file system cannot, so the caller falls back to two renames."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _link_or_copy(src: str, dst: str) -> None:
    try:  # a hard link keeps the very file, costs nothing and needs no space
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # another file system, or links refused: a copy
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(old: Path, new: Path, replaces: Collection[str]) -> None:
    """Put into `new` every entry of `old` that `new` has not and `replaces` does not name."""
    for entry in old.iterdir():
        if entry.name in replaces or os.path.lexists(new / entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        if path.is_symlink():
            continue
        if path.is_dir():
            fsync_dir(path)
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(folder)


def replace_folder(target: str | os.PathLike[str], write: Callable[[Path], Any], *,
                   replaces: Collection[str] = ()) -> Path:
    """Make `target` the folder `write(tmp)` fills, in one step, so a reader never sees a mix
    of old and new files: `write` fills a hidden folder beside `target`, which then takes its
    place (an atomic exchange on Linux; elsewhere two renames, with the old folder set aside as
    `.<name>.old-*` in between), and the old folder is removed.

    The entries of the old folder that `write` did not write and `replaces` does not name (a
    user's own files) are carried into the new one, as hard links where possible. A failure
    removes the hidden folder and leaves `target` as it was; the hidden folders of a killed
    writer are removed by the next `replace_folder` of the same target (the old folder it set
    aside, if `target` is missing, is first put back). A link to a folder is kept and the
    folder it points to is replaced.
    """
    target = Path(target).expanduser()
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() and (interrupted := interrupted_folder(target)) is not None:
        os.rename(interrupted, target)  # a killed writer set it aside: back first, files and all
    tmp = make_temp_dir(target.parent, f".{target.name}.new-{os.getpid()}-")
    aside = tmp.with_name(tmp.name.replace(".new-", ".old-", 1))
    _ACTIVE.update((tmp, aside))
    old = None  # the old folder, once the new one has taken its place
    try:
        write(tmp)
        exists = target.is_dir()
        if exists:
            _carry(target, tmp, replaces)
            shutil.copymode(target, tmp)  # a folder a group shares stays shared
        _fsync_tree(tmp)
        if not exists:
            os.rename(tmp, target)
        elif exchange_paths(tmp, target):
            old = tmp
        else:
            os.rename(target, aside)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(aside, target)  # should this fail, interrupted_folder() finds it
                raise
            old = aside
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder after a failure
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _ACTIVE.difference_update((tmp, aside))
    remove_stale_folders(target)
    return target


def _stale_folders(target: Path, kind: str = "*") -> list[Path]:
    """The hidden folders of `replace_folder` beside `target` that no live writer is using."""
    pattern, found = _folder_temp(target), []
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
        match = pattern.match(path.name)
        if match is None or path in _ACTIVE:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not _alive(pid):
            found.append(path)
    return found


def remove_stale_folders(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden folders `replace_folder` left beside `target` when its process was
    killed; returns what was removed."""
    removed = _stale_folders(Path(target))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def interrupted_folder(target: str | os.PathLike[str]) -> Path | None:
    """The old content of a missing `target` that a killed `replace_folder` set aside (only
    where it could not exchange the folders in one step), or None."""
    found = _stale_folders(Path(target), "old")
    return found[0] if found else None
