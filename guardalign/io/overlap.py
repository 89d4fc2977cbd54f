"""Outputs never land on inputs: the checks behind "nothing the user gave is ever overwritten".

Paths are compared by their real paths and by ``samefile`` (hard links and symlinks included).
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterable

from guardalign.errors import ConfigError, OutputError


def refuse(path, message: str, code: int = errno.EPERM) -> OutputError:
    """An OutputError (an OSError with ``code``) for a write guardalign itself refuses."""
    err = OutputError(message)
    err.errno, err.filename = code, os.fspath(path)
    return err


def special_target(path: str | os.PathLike) -> bool:
    """True when ``path`` exists and is (or links to) a character device, FIFO or socket, e.g. ``/dev/null``."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _real(a) == _real(b)


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, what: str = "--out") -> None:
    """ConfigError (exit 2, before anything is written) when ``out`` resolves to one of ``inputs`` (a file, or
    a folder given as input). ``"-"`` entries (stdin) are ignored; hard links and symlinks are seen through
    (``samefile``). Files found inside input folders are guarded at the write by :class:`InputFiles`.
    """
    out_s = os.fspath(out)
    if out_s == "-" or special_target(out_s):
        return
    for given in inputs:
        g = os.fspath(given)
        if g == "-" or not os.path.lexists(g):
            continue
        if _same(out_s, g):
            raise ConfigError(f"{what} {out_s} is one of the inputs ({g}); guardalign never writes over its "
                              "inputs: choose another output path")


def check_out_dir(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, force: bool = False) -> Path:
    """The real path of ``out_dir``; ConfigError when it overlaps an input in either direction.

    Refused: out_dir is an input folder, lies inside one (``force`` allows this: files found there are then
    excluded as inputs), contains an input folder or file, or is a file. Symlinks are resolved first.
    """
    root = Path(_real(out_dir))
    if os.path.lexists(root) and not root.is_dir():
        raise ConfigError(f"--out-dir {out_dir} exists and is not a directory")
    for given in inputs:
        g = os.fspath(given)
        if g == "-" or not os.path.lexists(g):
            continue
        real = _real(g)
        if os.path.isdir(real):
            if real == str(root):
                raise ConfigError(f"--out-dir {out_dir} is the input folder {g}: outputs would replace the "
                                  "originals; choose another --out-dir")
            if _inside(str(root), real) and not force:
                raise ConfigError(f"--out-dir {out_dir} is inside the input folder {g}: purified files would mix "
                                  "with the originals; choose another --out-dir (or pass --force)")
        if _inside(real, str(root)) and real != str(root):
            kind = "folder" if os.path.isdir(real) else "file"
            raise ConfigError(f"--out-dir {out_dir} contains the input {kind} {g}: outputs could replace the "
                              "originals; choose an --out-dir outside every input")
    return root


class InputFiles:
    """Identities (device, inode) of input files, so a write can refuse to land on one (checked at the write).

    ``add`` every input file as it is read (cheap: one ``stat``); ``check(target)`` raises OutputError (EPERM)
    when ``target`` is, or links to, one of them.
    """

    def __init__(self, paths: Iterable[str | os.PathLike] = ()):
        self._ids: set[tuple[int, int]] = set()
        for p in paths:
            self.add(p)

    def add(self, path: str | os.PathLike) -> None:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):
                self._ids.add((st.st_dev, st.st_ino))

    def __contains__(self, path) -> bool:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return False
        return (st.st_dev, st.st_ino) in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def check(self, target: str | os.PathLike) -> None:
        if target in self:
            raise refuse(target, f"refusing to write {os.fspath(target)}: it is one of the inputs "
                                 "(originals are never overwritten)")
