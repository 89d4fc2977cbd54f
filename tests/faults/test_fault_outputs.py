"""Fault suite, outputs (issue 11): atomic, locked, contained, never over an input, OSErrors → exit 5.

Every case asserts the promise, not only the exit code: what the user had is intact, what was written is
complete or absent (never torn), nothing lands outside the target, and the error is one line.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from guardalign.errors import EXIT_OUTPUT, ConfigError, OutputError
from guardalign.io import durable
from guardalign.io.sinks import JsonlSink, open_sink, read_records


def rec(i: int) -> dict:
    return {"id": f"r{i}", "status": "ok", "score": float(i)}


def no_temps(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(durable.TMP_SUFFIX)]


# ----------------------------------------------------------------------------- atomic write


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    durable.atomic_write(target, "new content")
    assert target.read_text() == "new content" and no_temps(tmp_path)
    mode = target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # shared like any file the user makes, not mkstemp's 0600


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputError, match="disk full") as exc:
        durable.atomic_write(target, "new")
    monkeypatch.undo()
    assert exc.value.exit_code == EXIT_OUTPUT and exc.value.errno == errno.ENOSPC
    assert isinstance(exc.value, OSError)  # per-item handlers that catch OSError still catch it
    assert target.read_text() == "old" and no_temps(tmp_path)


@pytest.mark.parametrize("length", [230, 250, 255])
def test_long_legal_names_can_be_written(tmp_path, length):
    """The temp file has a short name of its own, so a 255-byte target name works."""
    name = "x" * (length - 4) + ".png"
    durable.atomic_write(tmp_path / name, b"data")
    assert (tmp_path / name).read_bytes() == b"data" and no_temps(tmp_path)


def test_name_too_long_is_one_line_output_error(tmp_path):
    with pytest.raises(OutputError, match="file name too long") as exc:
        durable.atomic_write(tmp_path / ("y" * 300), b"x")
    assert "\n" not in str(exc.value) and exc.value.exit_code == 5


def test_dev_null_and_dev_full(tmp_path):
    durable.atomic_write("/dev/null", "fine")  # no temp file in /dev, no fsync (EINVAL on a device)
    with pytest.raises(OutputError, match="disk full"):
        durable.atomic_write("/dev/full", "x")


def test_read_only_file_system_is_output_error(tmp_path, monkeypatch):
    real_open = os.open

    def ro(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro)
    with pytest.raises(OutputError, match="read-only file system"):
        durable.atomic_write(tmp_path / "a.txt", "x")
    with pytest.raises(OutputError, match="read-only file system"):
        JsonlSink(tmp_path / "a.jsonl").write([rec(0)])
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_no_clobber_rename_refuses_a_file_that_appeared(tmp_path):
    target = tmp_path / "t"
    target.write_text("someone else's")
    with pytest.raises(OutputError, match="appeared while writing"):
        durable.atomic_write(target, "mine", overwrite=False)
    assert target.read_text() == "someone else's" and no_temps(tmp_path)


# ----------------------------------------------------------------------------- containment


def test_write_inside_root_refuses_a_symlinked_subfolder(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(OutputError, match="would leave"):
        durable.atomic_write(root / "sub" / "x.png", b"x", inside=root)
    with pytest.raises(OutputError, match="would leave"):
        durable.open_for_output(root / "sub" / "m.jsonl", inside=root)
    assert list(outside.iterdir()) == []


def test_sink_never_writes_through_a_symlink(tmp_path):
    """out-dir/manifest.jsonl as a symlink to a file outside: refused, the outside file untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to(victim)
    for resume in (False, True):
        with pytest.raises(OutputError, match="symlink"):
            sink = JsonlSink(out / "manifest.jsonl", resume=resume)
            sink.write([rec(1)])
    assert victim.read_text() == "precious\n"


def test_mask_manifest_symlink_is_refused_and_the_target_untouched(tmp_path, detector):
    from badinputs import make_good_images
    from guardalign.commands.mask import mask

    make_good_images(tmp_path / "in", 1)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to(victim)
    with pytest.raises(OutputError) as exc:
        mask([str(tmp_path / "in")], out_dir=str(out), detector=detector, progress=False)
    assert exc.value.exit_code == 5 and victim.read_text() == "precious\n"


def test_device_symlinks_still_work(tmp_path):
    (tmp_path / "devnull").symlink_to("/dev/null")
    sink = JsonlSink(tmp_path / "devnull")
    sink.write([rec(0)])
    sink.close()
    assert os.path.islink(tmp_path / "devnull")


# ----------------------------------------------------------------------------- inputs are never outputs


def test_check_not_input_sees_through_links(tmp_path):
    src = tmp_path / "lab.jsonl"
    src.write_text("{}\n")
    os.link(src, tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(src)
    for out in (src, tmp_path / "hard.jsonl", tmp_path / "soft.jsonl", tmp_path / "." / "lab.jsonl"):
        with pytest.raises(ConfigError, match="one of the inputs"):
            durable.check_not_input(out, [str(src)])
    durable.check_not_input(tmp_path / "other.jsonl", [str(src)])  # fine
    durable.check_not_input("-", [str(src)])


def test_out_dir_overlapping_an_input_in_either_direction_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "t.parquet").write_bytes(b"PAR1")
    cases = [(data, [data / "sub"]), (data, [data / "t.parquet"]), (data, [data]), (data / "sub" / "o", [data])]
    for out_dir, inputs in cases:
        with pytest.raises(ConfigError, match="--out-dir"):
            durable.check_out_dir(out_dir, [str(p) for p in inputs])
    assert durable.check_out_dir(tmp_path / "elsewhere", [str(data)]) == (tmp_path / "elsewhere").resolve()
    assert durable.check_out_dir(data / "sub" / "o", [str(data)], force=True)  # the documented escape hatch


def test_input_files_guard_refuses_at_the_write(tmp_path):
    original = tmp_path / "x.png"
    original.write_bytes(b"original")
    guard = durable.InputFiles([original])
    (tmp_path / "alias.png").symlink_to(original)
    for target in (original, tmp_path / "alias.png"):
        with pytest.raises(OutputError, match="one of the inputs"):
            durable.atomic_write(target, b"purified", protect=guard)
    assert original.read_bytes() == b"original"


# ----------------------------------------------------------------------------- sinks


def test_concurrent_parquet_outputs_second_run_stops_at_start(tmp_path):
    """Two scans to one Parquet --out: the second is refused when it opens, so the first run's records stay."""
    out = tmp_path / "scan.parquet"
    first = open_sink(str(out), "parquet")
    with pytest.raises(ConfigError, match="another running guardalign"):
        open_sink(str(out), "parquet")
    first.write([rec(i) for i in range(3)])
    first.close()
    with pytest.raises(ConfigError, match="exists"):
        open_sink(str(out), "parquet")  # finished: a new run without --resume must not replace it
    assert [r["id"] for r in read_records(out)] == ["r0", "r1", "r2"]
    assert not (tmp_path / "scan.parquet.partial.jsonl").exists()


def test_parquet_sink_that_fails_to_open_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "scan.parquet"
    sink = open_sink(str(out), "parquet")
    sink.abort()
    assert not (tmp_path / "new").exists()


def test_jsonl_write_failure_cuts_back_to_the_last_whole_line_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "scan.jsonl"
    sink = JsonlSink(out)
    sink.write([rec(0), rec(1)])
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutputError, match="disk full"):
        sink.write([rec(2), rec(3)])
    monkeypatch.undo()
    sink.abort()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r0", "r1"]  # no torn line
    again = JsonlSink(out, resume=True)
    assert again.existing == {"r0", "r1"}
    again.write([rec(2), rec(3)])
    again.close()
    assert [r["id"] for r in read_records(out)] == ["r0", "r1", "r2", "r3"]


def test_stdout_that_cannot_be_written_is_output_error(monkeypatch):
    import sys

    class Full:  # stdout redirected to /dev/full
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = write

    monkeypatch.setattr(sys, "stdout", Full())
    sink = open_sink("-")
    with pytest.raises(OutputError, match="stdout: disk full"):
        sink.write([rec(0)])


def test_records_with_undecodable_names_are_valid_utf8_json(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    out = tmp_path / "s.jsonl"
    with JsonlSink(out) as sink:
        sink.write([{"id": name, "error": f"cannot read {name}"}])
    line = out.read_bytes().decode("utf-8")  # strict: it must be UTF-8
    assert json.loads(line)["id"] == "caf\\xe9.png"


# ----------------------------------------------------------------------------- report


def test_report_never_replaces_its_input_and_writes_dev_null(tmp_path):
    from guardalign.reporting.collect import report

    scan = tmp_path / "scan.jsonl"
    scan.write_text(json.dumps({"id": "a", "source": "a.png", "status": "ok", "verdict": "safe", "score": 0.9,
                                "threshold": 0.5, "category": "x", "categories": {"x": 0.9}}) + "\n")
    before = scan.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(scan)
    for out in (scan, tmp_path / "link.jsonl"):
        with pytest.raises(ConfigError, match="one of the inputs"):
            report([scan], out=out, format="json")
    assert scan.read_bytes() == before
    report([scan], out="/dev/null", format="md")  # a device works (no temp file, no fsync)


def test_report_links_only_inside_the_allowed_roots(tmp_path, monkeypatch):
    from guardalign.reporting.collect import report

    monkeypatch.chdir(tmp_path)
    from PIL import Image

    Image.new("RGB", (30, 20), (200, 0, 0)).save(tmp_path / "inside.png")
    base = {"status": "ok", "verdict": "unsafe", "score": 0.1, "threshold": 0.5, "category": "x",
            "categories": {"x": 0.1}, "method": "global"}
    recs = [{**base, "id": "in", "source": "inside.png"}, {**base, "id": "pw", "source": "/etc/passwd"},
            {**base, "id": "env", "source": f"/proc/{os.getpid()}/environ"}]
    (tmp_path / "scan.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "imgs_only").mkdir()
    report([tmp_path / "scan.jsonl"], out=tmp_path / "r.html", format="html", image_root=[tmp_path / "imgs_only"])
    page = (tmp_path / "r.html").read_text()
    assert "file:///etc/passwd" not in page and "/environ\"" not in page and "file:///proc" not in page
    report([tmp_path / "scan.jsonl"], out=tmp_path / "r2.html", format="html", image_root=[tmp_path])
    assert (tmp_path / "inside.png").as_uri() in (tmp_path / "r2.html").read_text()


def test_parquet_merge_failure_keeps_the_journal_for_resume(tmp_path, monkeypatch):
    out = tmp_path / "scan.parquet"
    sink = open_sink(str(out), "parquet")
    sink.write([rec(0), rec(1)])
    real = durable.finish_temp

    def full(tmp, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable, "finish_temp", full)
    with pytest.raises(OutputError, match="disk full"):
        sink.close()
    monkeypatch.setattr(durable, "finish_temp", real)
    assert not out.exists() and no_temps(tmp_path)
    assert (tmp_path / "scan.parquet.partial.jsonl").stat().st_size > 0  # nothing lost
    again = open_sink(str(out), "parquet", resume=True)
    assert again.existing == {"r0", "r1"}
    again.write([rec(2)])
    again.close()
    assert [r["id"] for r in read_records(out)] == ["r0", "r1", "r2"]
