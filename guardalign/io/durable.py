"""Durable, contained outputs: the one atomic write, locks, symlink-free opens, and input protection.

Every file guardalign writes goes through this module:

- :func:`atomic_write`: temp file in the target's folder (a short name, ``.<8 hex>.guardalign-tmp``, so
  a 255-byte target name still works), ``fsync``, ``os.replace``, ``fsync`` of the folder. A crash leaves
  the old file or the new one, never a mix. A character device or FIFO target (``/dev/null``,
  ``/dev/stdout``) is written directly, without ``fsync`` (which such files refuse with EINVAL).
- :func:`open_for_output`: an fd for appending (JSONL sinks); never through a symlink that points at a
  regular file (``O_NOFOLLOW``), and with ``inside=root`` never outside ``root``.
- :func:`lock` / :func:`open_locked`: one writer per output (``fcntl.flock``, non-blocking).
- :func:`check_not_input` / :func:`check_out_dir` / :class:`InputFiles`: no output resolves to an input file;
  an out-dir never overlaps an input folder or file.
- Any ``OSError`` on an output becomes :class:`~guardalign.errors.OutputError` (exit 5, one line naming the
  path and the cause). It is also an ``OSError`` (same ``errno``), so per-item handlers still catch it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Iterable

from guardalign.errors import ConfigError, OutputError, output_error
from guardalign.io.overlap import (  # noqa: F401 (the overlap checks stay importable from here)
    InputFiles, _inside, check_not_input, check_out_dir, refuse, special_target,
)

TMP_SUFFIX = ".guardalign-tmp"  # temp files are ".<8 hex digits>.guardalign-tmp" (24 bytes)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _oserror(path, exc: OSError, what: str = "cannot write") -> OutputError:
    if isinstance(exc, OutputError):
        return exc
    err = output_error(path, exc, what)
    err.errno, err.filename = exc.errno, os.fspath(path)
    return err


# ----------------------------------------------------------------------------- small primitives


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def is_regular_fd(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def fsync_fd(fd: int) -> None:
    """``fsync`` a regular file; a device, FIFO or socket (``/dev/null``, a pipe) has nothing to sync."""
    if is_regular_fd(fd):
        os.fsync(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a new or replaced directory entry durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_inside(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """OutputError (EPERM) unless the folder of ``path`` really lies in ``root`` (symlinked folders resolved)."""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if not _inside(parent, os.path.realpath(root)):
        raise refuse(path, f"refusing to write {os.fspath(path)}: it would leave {os.fspath(root)} "
                           "(a symlinked folder)")


def refuse_symlink(path: Path) -> None:
    """A symlink at ``path`` is never written through, unless it points at a device or FIFO (``/dev/stdout``)."""
    if os.path.islink(path) and not special_target(path):
        raise refuse(path, f"refusing to write through the symlink {path} (outputs never follow symlinks); "
                           "give the real path", errno.ELOOP)


def make_parents(path: str | os.PathLike) -> list[Path]:
    """Create the missing folders above ``path``; return them, outermost first (for :func:`remove_empty`)."""
    missing = []
    for parent in Path(os.path.abspath(path)).parents:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _oserror(Path(path).parent, e, "cannot create folder") from None
    return missing[::-1]


def remove_empty(folders: list[Path]) -> None:
    """Remove folders made by :func:`make_parents` again, innermost first, while they are empty."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            return


# ----------------------------------------------------------------------------- locks


def lock(fd: int, path: str | os.PathLike) -> None:
    """Exclusive, non-blocking ``flock`` on ``fd``; ConfigError when another guardalign holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"{path} is being written by another running guardalign") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):  # no locks on this FS: go on unlocked
            raise


def open_locked(path: str | os.PathLike, *, inside: str | os.PathLike | None = None, append: bool = True) -> int:
    """Open (creating) ``path`` for writing, locked; the lock is on the file that is linked at ``path`` now.

    Another process that unlinks the file while we wait cannot leave us holding a lock on a deleted inode:
    the identity is checked after locking, and the open retried. OutputError on an OSError.
    """
    for _ in range(20):
        fd = open_for_output(path, inside=inside, append=append)
        if not is_regular_fd(fd):  # /dev/null, a pipe: many writers are fine, nothing to lock
            return fd
        try:
            lock(fd, path)
            st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                os.close(fd)
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise refuse(path, f"{path} keeps being replaced by another process; not written", errno.EBUSY)


# ----------------------------------------------------------------------------- opening and writing


def open_for_output(path: str | os.PathLike, *, inside: str | os.PathLike | None = None, append: bool = True,
                    create: bool = True) -> int:
    """A write-only fd for ``path`` (appending by default, created 0666 & ~umask).

    A symlink at ``path`` is never followed unless it names a device or FIFO; with ``inside`` the path must
    lie in that folder and no symlink at all is followed. Raises OutputError (an OSError) naming the path.
    """
    path = Path(path)
    if inside is not None:
        check_inside(path, inside)
    flags = os.O_WRONLY | _CLOEXEC | (os.O_APPEND if append else 0) | (os.O_CREAT if create else 0)
    if inside is not None or not special_target(path):
        flags |= _NOFOLLOW
        if inside is None:
            refuse_symlink(path)
    try:
        return os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refuse(path, f"refusing to write through the symlink {path} (outputs never follow symlinks)",
                         errno.ELOOP) from None
        raise _oserror(path, e) from None


def atomic_write(path: str | os.PathLike, data: bytes | str, *, inside: str | os.PathLike | None = None,
                 overwrite: bool = True, protect: "InputFiles | None" = None) -> None:
    """Replace ``path`` with ``data`` atomically (module docstring); ``str`` data is written as UTF-8.

    Parameters
    ----------
    inside : folder ``path`` must stay in (its folder's real path is checked, so symlinked sub-folders fail).
    overwrite : False refuses (EEXIST) when ``path`` exists, checked at the rename itself (``os.link``).
    protect : input files ``path`` must not resolve to (checked here, at the write).

    Raises OutputError (an OSError) naming the path and the cause; the temp file never stays behind.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if inside is not None:
        check_inside(path, inside)
    if protect is not None:
        protect.check(path)
    if inside is None and special_target(path):
        return _write_special(path, payload)
    if os.path.lexists(path) and os.path.isdir(path) and not os.path.islink(path):
        raise refuse(path, f"cannot write {path}: it is a directory", errno.EISDIR)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _oserror(folder, e, "cannot create folder") from None
    tmp = folder / f".{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        try:
            write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        _rename(tmp, path, overwrite)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _oserror(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def _rename(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with EEXIST if anything is there, atomically
    except FileExistsError:
        raise refuse(path, f"{path} appeared while writing; not overwritten", errno.EEXIST) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):  # no hard links here: the next best check
            raise refuse(path, f"{path} appeared while writing; not overwritten", errno.EEXIST) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _write_special(path: Path, payload: bytes) -> None:
    """Write into a device or FIFO (``/dev/null``, ``/dev/stdout``): no temp file, no fsync."""
    try:
        fd = os.open(path, os.O_WRONLY | _CLOEXEC)
        try:
            write_all(fd, payload)
        finally:
            os.close(fd)
    except OSError as e:
        raise _oserror(path, e) from None


def write_parts(path: str | os.PathLike, write, *, inside: str | os.PathLike | None = None) -> None:
    """Like :func:`atomic_write`, for writers that need a file name: ``write(tmp_path)`` fills the temp file.

    For pyarrow's ParquetWriter and the like. The temp file is fsynced, renamed over ``path``; OutputError on
    an OSError; the temp file never stays behind.
    """
    path = Path(path)
    if inside is not None:
        check_inside(path, inside)
    if os.path.isdir(path) and not os.path.islink(path):
        raise refuse(path, f"cannot write {path}: it is a directory", errno.EISDIR)
    tmp = temp_path(path)
    try:
        write(tmp)
        finish_temp(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh short temp-file name beside ``path`` (for writers that stream into it; see :func:`finish_temp`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _oserror(path.parent, e, "cannot create folder") from None
    return path.parent / f".{secrets.token_hex(4)}{TMP_SUFFIX}"


def finish_temp(tmp: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """fsync ``tmp`` and rename it over ``path`` (then fsync the folder); OutputError on an OSError."""
    try:
        fd = os.open(tmp, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _rename(Path(tmp), Path(path), overwrite)
    except OSError as e:
        raise _oserror(path, e) from None
    fsync_dir(Path(path).parent)


def remove_stale_temps(root: str | os.PathLike) -> int:
    """Delete this module's temp files under ``root`` (left by a killed run; call only while holding its lock)."""
    n = 0
    if not os.path.isdir(root):
        return 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
    return n


# ----------------------------------------------------------------------------- inputs are never outputs
