"""File names as record text: a lossless escape for names that are not clean UTF-8 (pure, no I/O).

POSIX file names are bytes. Python hands undecodable bytes over as lone surrogates (``surrogateescape``),
which cannot be written as UTF-8 JSON. Record ids and sources use :func:`escape_name`:

- a name that decodes as UTF-8 and holds no backslash is kept exactly as it is (ids of ordinary files never
  change);
- otherwise every backslash is doubled (``\\`` → ``\\\\``) and every undecodable byte becomes ``\\xNN`` (two
  lower-case hex digits); a lone surrogate that did not come from a byte (only possible from JSON text)
  becomes ``\\uDXXX``.

An escaped name always contains a backslash and a kept one never does, so the mapping is injective and
:func:`unescape_name` gives the original bytes back: ``unescape_name(escape_name(os.fsdecode(b))) == b``.
"""
from __future__ import annotations

import os
import re
from typing import Iterator, TextIO

_UNESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[dD][89a-fA-F][0-9a-fA-F]{2})")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def escape_name(name: str | bytes | os.PathLike) -> str:
    """Record text for a file name or path (module docstring); JSON-safe, lossless."""
    text = os.fsdecode(os.fspath(name))
    if "\\" not in text and not _has_surrogate(text):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_name(text: str) -> bytes:
    """The file-name bytes of an id made by :func:`escape_name`."""
    if "\\" not in text:
        return text.encode("utf-8")

    def one(m: re.Match) -> str:
        tok = m.group(1)
        if tok == "\\":
            return "\\"
        if tok[0] == "x":
            return chr(0xDC00 + int(tok[1:], 16))
        return chr(int(tok[1:], 16))

    return os.fsencode(_UNESCAPE.sub(one, text))


def printable(text: str | bytes | os.PathLike) -> str:
    """One-line, printable, UTF-8-safe text for messages: :func:`escape_name`, and control characters as ``\\xNN``."""
    s = escape_name(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in s)


def json_safe(text: str) -> str:
    """``text`` if it encodes as UTF-8, else with its lone surrogates escaped as :func:`escape_name` does."""
    if not _has_surrogate(text):
        return text
    return "".join(
        (f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}")
        if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def null_separated(stream: TextIO) -> Iterator[str]:
    """Paths separated by NUL bytes (``find -print0``); read in chunks, so a long list stays streamed."""
    raw = getattr(stream, "buffer", None)
    rest = b"" if raw is not None else ""
    while True:
        chunk = raw.read(1 << 16) if raw is not None else stream.read(1 << 16)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\0" if raw is not None else "\0")
        rest = parts.pop()
        for p in parts:
            yield os.fsdecode(p) if raw is not None else p
    if rest:
        yield os.fsdecode(rest) if raw is not None else rest
