"""guardalign.io.jsonl: the one JSON-lines reader and its error convention (a bad line is a value, never a crash)."""
from __future__ import annotations

import pytest

from guardalign.errors import InputError
from guardalign.io.jsonl import iter_lines, parse_line, read_objects


def test_parse_line_never_raises():
    assert parse_line(b'{"a": 1}') == ({"a": 1}, None)
    assert parse_line('[1, 2]') == ([1, 2], None)
    assert parse_line(b"[" * 100_000) == (None, "invalid JSON (nested too deeply)")
    value, error = parse_line(b"\xff{}")
    assert value is None and error.startswith("not UTF-8 (byte 0")
    value, error = parse_line(b"{oops}")
    assert value is None and error.startswith("invalid JSON (Expecting property name")


def test_lines_keep_their_numbers_bom_and_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"n": 1}\n\n  \n{"n": 4}\r\n[\n{"n": 6}')
    got = [(ln.n, ln.value, ln.error, ln.torn) for ln in iter_lines(path)]
    assert got[:2] == [(1, {"n": 1}, None, False), (4, {"n": 4}, None, False)]
    assert got[2][0] == 5 and got[2][2].startswith("invalid JSON")
    assert got[3] == (6, {"n": 6}, None, True)  # no newline at the end: marked torn
    assert [ln.end for ln in iter_lines(path)][-1] == path.stat().st_size


def test_read_objects_is_strict_but_forgives_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "sco')
    assert [o["id"] for _, o in read_objects(path)] == ["a", "b"]
    path.write_text('{"id": "a"}\n[1]\n')
    with pytest.raises(InputError, match=r"r.jsonl:2: expected a JSON object in the records, got list"):
        list(read_objects(path))
    path.write_text('{"id": "a"}\n' + "[" * 50_000 + "\n")
    with pytest.raises(InputError, match=r"r.jsonl:2: invalid JSON \(nested too deeply\)"):
        list(read_objects(path))
    with pytest.raises(InputError, match="cannot read"):
        list(read_objects(tmp_path / "missing.jsonl"))
