"""JSONL record writers that survive a crash at any instant, and resume (see :mod:`guardalign.io.sinks`).

Each batch is encoded first, then appended with one ``write`` + ``fsync``, so a crash leaves a valid prefix plus
at most one torn last line; ``resume`` cuts the torn line and appends. Lines are strict JSON (NaN/inf become
null). :class:`StdoutSink` writes to stdout. The Parquet sink journals through :class:`JsonlSink`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Iterator, Protocol

from guardalign.errors import ConfigError, InputError  # noqa: F401
from guardalign.io import durable
from guardalign.pathnames import json_safe

# The base of every sink (JSONL here, Parquet in guardalign.io.parquet).
class _Closing:
    """``with`` support: close on success; on an exception abort (create nothing new, keep journals)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Sink(Protocol):
    def write(self, records: list[dict]) -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- JSON encoding


def _jsonable(obj):
    """Strict-JSON-safe copy: non-finite floats → None, numpy → Python, tuples → lists, paths → str."""
    if isinstance(obj, str):
        return json_safe(obj)  # a lone surrogate (an undecodable file-name byte) would not encode as UTF-8
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {json_safe(str(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return _jsonable(obj.tolist())
    raise TypeError(f"cannot write a {type(obj).__name__} value to a record")


def dumps(record: dict) -> str:
    """One strict JSON line (no trailing newline)."""
    return json.dumps(_jsonable(record), ensure_ascii=False, allow_nan=False)


def _encode(records: list[dict]) -> bytes:
    """Complete JSON lines for ``records``; TypeError names the record that cannot be encoded."""
    lines = []
    for r in records:
        try:
            lines.append(dumps(r) + "\n")
        except TypeError as e:
            raise TypeError(f"record {r.get('id')!r}: {e}") from None
    return "".join(lines).encode("utf-8")


# ----------------------------------------------------------------------------- JSONL


def _scan_jsonl(path: Path) -> tuple[set[str], int]:
    """Ids of a JSONL output and the byte length of its valid prefix.

    Only what a crash can leave is dropped from the prefix: a last line without its newline that
    starts a record (``{``) or is zero-filled. Any other bad line is a ConfigError naming it, so a
    file that is not a guardalign output is never truncated.
    """
    from guardalign.io.jsonl import iter_raw, parse_line

    ids: set[str] = set()
    good_end = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError(f"cannot resume: cannot read {path} ({e.strerror or e})") from None
    with f:
        for lineno, raw, end in iter_raw(f):
            if not raw.endswith(b"\n"):
                if raw.lstrip().startswith(b"{") or not raw.strip(b"\x00"):
                    break  # torn by a crash inside a write
                raise ConfigError(f"{path}:{lineno}: not a JSON record; is this a guardalign output?")
            if raw.strip():
                rec, _ = parse_line(raw)
                if not isinstance(rec, dict):
                    raise ConfigError(f"{path}:{lineno}: not a valid JSON record; cannot resume safely")
                if "id" not in rec:
                    raise ConfigError(f"{path}:{lineno}: record has no 'id'; is this a guardalign output?")
                ids.add(str(rec["id"]))
            good_end = end
    return ids, good_end


def _check_target(path: Path) -> None:
    """ConfigError for an --out that cannot be a file; OutputError when it cannot even be looked at."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:  # ENAMETOOLONG, EACCES on a parent, ELOOP ...
        raise durable._oserror(path, e, "cannot write") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"--out {path} is a directory; give a file name")
    try:
        parent = next((p for p in path.absolute().parents if os.path.lexists(p)), None)
    except OSError as e:
        raise durable._oserror(path, e, "cannot write") from None
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {path}: {parent} is not a directory")


def _size(path: Path) -> int:
    """Bytes in an existing regular file (0 for a missing file or a device such as /dev/null)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise durable._oserror(path, e, "cannot write") from None
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


class JsonlSink(_Closing):
    """Append-only JSONL file; see the module docstring for the crash and resume guarantees.

    ``claim=True`` creates and locks the file now (before anything is read), instead of at the first write;
    an empty file it created is removed again by ``abort``.
    """

    def __init__(self, path: str | Path, resume: bool = False, *, claim: bool = False):
        self.path = Path(path)
        self.resume = resume
        self.existing: set[str] = set()  # ids already in the file (resume)
        self._keep: int | None = None  # resume: bytes of the valid prefix to keep
        self._fd: int | None = None
        self._closed = False
        self._created = False  # this sink created the file (so abort may remove it while still empty)
        self._wrote = False  # at least one record was written by this sink
        self._made: list[Path] = []  # folders created for the file (removed again by abort if left empty)
        self._ready = False  # the first-open checks (cut a torn tail, refuse a file that appeared) are done
        _check_target(self.path)
        durable.refuse_symlink(self.path)
        if claim:
            self._acquire()
        try:
            if _size(self.path) > 0:
                if not resume:
                    raise ConfigError(f"{self.path} exists; pass --resume to continue it or choose another --out")
                self.existing, self._keep = _scan_jsonl(self.path)
        except BaseException:
            self.abort()
            raise

    def _acquire(self) -> int:
        """Open (creating) and lock the file."""
        if self._fd is None:
            self._made = durable.make_parents(self.path)
            existed = os.path.lexists(self.path)
            try:
                self._fd = durable.open_locked(self.path)
            except BaseException:
                durable.remove_empty(self._made)
                raise
            self._created = not existed
            if self._created:
                durable.fsync_dir(self.path.parent)
        return self._fd

    def _open(self) -> int:
        """The locked fd; on the first call, the torn tail of a resumed file is cut (or a file that appeared
        since the start is refused)."""
        fd = self._acquire()
        if not self._ready:
            if durable.is_regular_fd(fd):
                size = os.fstat(fd).st_size
                if self._keep is not None and size > self._keep:
                    os.ftruncate(fd, self._keep)  # drop the torn tail of a crashed run
                elif self._keep is None and size > 0:
                    self.abort()
                    raise ConfigError(f"{self.path} appeared while starting; not overwriting it")
            self._ready = True
        return fd

    def claim(self) -> None:
        """Open and lock the file now (creating it if needed), before the first write: ConfigError when another
        running guardalign holds it."""
        self._open()

    def write(self, records: list[dict]) -> None:
        """Append ``records`` as complete lines, durable on return.

        An OSError (disk full, I/O error) becomes OutputError; the file is cut back to its last complete line,
        so ``--resume`` continues it.
        """
        if self._closed:
            raise ValueError(f"write to closed sink {self.path}")
        if not records:
            return
        data = _encode(records)  # fails before touching the file
        try:
            fd = self._open()
            before = os.fstat(fd).st_size if durable.is_regular_fd(fd) else None
            try:
                durable.write_all(fd, data)
                durable.fsync_fd(fd)
            except OSError:
                if before is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, before)
                raise
        except OSError as e:
            raise durable._oserror(self.path, e) from None
        self._wrote = True

    def close(self) -> None:
        """Finish (creating an empty file if nothing was written). Idempotent."""
        if self._closed:
            return
        self._open()
        os.close(self._fd)
        self._fd, self._closed = None, True

    def abort(self) -> None:
        """Stop without creating anything that does not exist yet; written lines stay."""
        if self._fd is not None and self._created and not self._wrote:
            with contextlib.suppress(OSError):
                st, now = os.fstat(self._fd), os.lstat(self.path)
                if stat.S_ISREG(st.st_mode) and st.st_size == 0 and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    os.unlink(self.path)  # still ours and locked by us: nobody else uses it
                    durable.remove_empty(self._made)
        self.release()

    def release(self) -> None:
        """Close the file (dropping the lock) as it is now."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._closed = None, True


class StdoutSink(_Closing):
    """JSON lines to stdout (flushed per batch); nothing to resume."""

    def __init__(self):
        self.existing: set[str] = set()  # nothing to resume on stdout

    def write(self, records: list[dict]) -> None:
        if records:
            out = sys.stdout
            try:
                out.write(_encode(records).decode("utf-8"))
                out.flush()
            except OSError as e:  # a closed pipe, stdout redirected to /dev/full ...
                raise durable._oserror("stdout", e) from None

    def close(self) -> None:
        try:
            sys.stdout.flush()
        except OSError as e:
            raise durable._oserror("stdout", e) from None

    def abort(self) -> None:
        self.close()
