"""Where a tool may write a checkpoint folder, and how it gets there without ever destroying data.

The rules for a destination folder ``OUT`` (:func:`check_destination`), applied to the path with symlinks
resolved and, where the folders exist, by identity (``os.path.samefile``: bind mounts and hard-linked paths
count as the same folder):

1. ``OUT`` never equals, contains or lies inside a source folder of the command (the model it reads);
2. ``OUT`` never equals or contains the current folder or the home folder, and is never a filesystem root
   (``/`` or a mount point);
3. ``OUT`` itself is not a symbolic link (replacing it would replace the link, not the folder it names);
4. an existing ``OUT`` is replaced only with ``--overwrite``, and only when it is empty or an a3-serve output
   (:func:`is_a3_output`): a folder of anything else is never deleted, whatever the flags;
5. the nearest existing ancestor of ``OUT`` is a writable folder.

The write itself (:func:`swap_into_place`): the result is built in a hidden sibling folder and renamed to
``OUT`` at the end; an old ``OUT`` is renamed aside first and deleted only after the new one is in place, and
rule 4 is checked again at that instant (the folder may have changed during a long export).

Hidden work folders are owned through :class:`FolderLock`, an ``flock`` on a file inside them: the kernel
drops the lock when its process dies, so a stale folder is recognised even after its PID was reused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from a3_serve.errors import InputError

#: the lock file inside a hidden work folder
LOCK_NAME = ".a3-lock"
#: files that mark a folder as written by a3-serve
A3_MARKERS = ("a3_report.json",)


def is_a3_output(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint written by a3-serve (config.json with model_type a3_llama or an
    ``a3`` block, or an ``a3_report.json``)."""
    folder = Path(folder)
    if any((folder / m).is_file() for m in A3_MARKERS):
        return True
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("model_type") == "a3_llama" or isinstance(cfg.get("a3"), dict))


def _is_empty_dir(folder: Path) -> bool:
    try:
        return not any(Path(folder).iterdir())
    except OSError:
        return False


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def contains(outer: Path, inner: Path) -> bool:
    """Whether folder ``outer`` equals or contains path ``inner`` (both resolved; by identity where they exist)."""
    outer, inner = Path(outer).resolve(), Path(inner).resolve()
    if not outer.exists():
        return outer == inner or outer in inner.parents
    return any(_same(outer, p) for p in (inner, *inner.parents) if p.exists())


def _is_fs_root(path: Path) -> bool:
    return path == Path(path.anchor) or (path.exists() and os.path.ismount(path))


def check_destination(out_dir: Path, overwrite: bool, sources: tuple[Path, ...] = (), flag: str = "--out",
                      source_flag: str = "--model") -> Path:
    """Apply the module's rules to ``out_dir`` before any work starts; returns the resolved path.

    Raises :class:`InputError` (one line naming the rule and the fix) for a destination that breaks a rule.
    """
    given = Path(out_dir).expanduser()
    shown = str(out_dir)
    if given.is_symlink():
        raise InputError(f"{flag} {shown!r} is a symbolic link; give the real folder path (or a new name) instead")
    out = given.resolve()
    for src in sources:
        src = Path(src).expanduser()
        if contains(out, src):
            what = "is" if _same(out, src.resolve()) else "contains"
            raise InputError(f"{flag} {shown!r} {what} the source folder {str(src)!r} ({source_flag}); write to a new "
                             "folder outside it")
        if contains(src, out):
            raise InputError(f"{flag} {shown!r} lies inside the source folder {str(src)!r} ({source_flag}); choose a "
                             "folder outside it")
    for name, place in (("the current folder", Path.cwd()), ("your home folder", Path.home())):
        if contains(out, place):
            what = "is" if _same(out, place.resolve()) else "contains"
            raise InputError(f"{flag} {shown!r} {what} {name}; write to a new folder such as {flag} ./compressed")
    if _is_fs_root(out):
        raise InputError(f"{flag} {shown!r} is a filesystem root; write to a new folder inside it")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{flag} {shown!r} is a file; choose a folder path")
        if not overwrite:
            raise InputError(f"output folder {shown!r} already exists; choose another {flag} or pass --overwrite to "
                             "replace it")
        check_replaceable(out, shown, flag)
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise InputError(f"cannot create {flag} {shown!r}: {str(ancestor)!r} is not a writable folder; choose a "
                         "writable location")
    return out


def check_output_file(path: Path, flag: str, folders: tuple[tuple[str, Path], ...] = ()) -> Path:
    """A file a command writes next to its main output (e.g. ``--json FILE``), checked before any work starts: it
    must not be a folder, must not lie inside any of ``folders`` (``(flag, path)`` pairs: the source model, the
    checkpoint being written), whose files it would replace, and its folder must be writable or creatable (the
    nearest existing ancestor a writable folder; :func:`write_output_file` creates the rest)."""
    given = Path(path).expanduser()
    target = given.resolve()
    if target.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a folder; give a file path such as {flag} report.json")
    for other_flag, folder in folders:
        if contains(Path(folder).expanduser(), target):
            raise InputError(f"{flag} {str(path)!r} lies inside {other_flag} {str(folder)!r} and would replace its "
                             "files; write it elsewhere")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file, not a folder; choose another path")
    if not os.access(ancestor, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(f"{flag} {str(path)!r} is not writable; choose a path you can write to")
    return target


def write_output_file(path: Path, text: str) -> None:
    """Write a file checked by :func:`check_output_file`, creating its folder, atomically (a temporary file beside
    it, then a rename)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)


def check_replaceable(out: Path, shown: str | None = None, flag: str = "--out",
                      may_replace: Callable[[Path], bool] = is_a3_output) -> None:
    """Rule 4: an existing folder may be replaced only when it is empty or ``may_replace(out)`` holds."""
    if out.is_dir() and not _is_empty_dir(out) and not may_replace(out):
        raise InputError(f"{flag} {shown or str(out)!r} is not an a3-serve output and is not empty; --overwrite "
                         "replaces only folders a3-serve wrote: choose a new folder, or move that one away yourself")


def swap_into_place(tmp: Path, out_dir: Path, overwrite: bool, flag: str = "--out",
                    may_replace: Callable[[Path], bool] = is_a3_output) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir``; an existing ``out_dir`` (only with ``overwrite``, and only
    when rule 4 still holds) is renamed aside first and deleted after the rename."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise InputError(f"{flag} {str(out_dir)!r} became a symbolic link during the run; nothing was replaced")
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not overwrite:  # appeared while we were working
        raise InputError(f"output folder {str(out_dir)!r} appeared during the run; pass --overwrite or choose another "
                         f"{flag}")
    check_replaceable(out_dir, None, flag, may_replace)
    old = out_dir.resolve().parent / f".{out_dir.name}.a3-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


class FolderLock:
    """An exclusive ``flock`` on ``folder / name``, held while this object lives (or until :meth:`release`).

    The file records the holder's PID for messages only; ownership is the kernel's lock, which disappears
    with the process, so PID reuse can never make a dead export look alive.
    """

    def __init__(self, folder: Path, name: str = LOCK_NAME):
        self.path = Path(folder) / name
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if no living process holds it; True on success."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The PID recorded by the holder (for messages), or '?'."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def folder_abandoned(folder: Path, name: str = LOCK_NAME) -> bool | None:
    """Whether a hidden work folder's owner is gone: True (no process holds its lock), False (in use),
    None (no lock file: written by an older version, or being renamed into place right now)."""
    if not (Path(folder) / name).is_file():
        return None
    probe = FolderLock(folder, name)
    try:
        if probe.try_acquire():
            probe.release()
            return True
    except OSError:
        return None
    return False


def folder_size(folder: Path) -> int:
    """Bytes of the regular files under ``folder``."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def fmt_bytes(n: float) -> str:
    """``1.2 GB``-style size for messages (binary units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
