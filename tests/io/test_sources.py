"""guardalign.io.sources: every input kind, stable ids, up-front validation, ordered bounded decoding."""
from __future__ import annotations

import io
import os
import random
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badinputs import EXPECTED, make_bad_inputs, make_good_images, make_parquet_variants
from guardalign.io import images as imageio
from guardalign.errors import ConfigError, InputError
from guardalign.io.sources import READERS, Decoded, Item, count_items, decode_stream, iter_items


@pytest.fixture(scope="module")
def pqv(tmp_path_factory):
    return make_parquet_variants(tmp_path_factory.mktemp("pq"))


def ids(items) -> list[str]:
    return [i.id for i in items]


def tree(root: Path) -> Path:
    for rel in ("b.png", "a.JPG", "notes.txt", "sub/c.png", "sub/deeper/d.gif", "a_dir/x.webp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (root / rel).write_text("not an image")
        else:
            make_good_images(root / "_tmp", 1, ext=Path(rel).suffix)[0].rename(root / rel)
    (root / "_tmp").rmdir()
    return root


def test_readers_registry_has_every_kind():
    assert set(READERS) == {"folder", "image", "parquet", "list", "tar"}


def test_folder_is_recursive_sorted_and_filtered_by_extension(tmp_path):
    root = tree(tmp_path / "data")
    items = list(iter_items([str(root)]))
    assert ids(items) == ["a.JPG", "b.png", "a_dir/x.webp", "sub/c.png", "sub/deeper/d.gif"]
    assert all(i.path == root / i.id and i.source == str(root / i.id) and i.error is None for i in items)
    assert items[3].meta == {"root": str(root), "rel": "sub/c.png"}
    decoded = list(decode_stream(items, workers=2))
    assert [d.error for d in decoded] == [None] * 5 and decoded[3].image.mode == "RGB"


def test_ids_are_stable_when_the_folder_moves(tmp_path):
    a = list(iter_items([str(tree(tmp_path / "one"))]))
    os.rename(tmp_path / "one", tmp_path / "two")
    assert ids(a) == ids(iter_items([str(tmp_path / "two")]))


def test_multiple_inputs_prefix_folder_ids(tmp_path):
    make_good_images(tmp_path / "train", 2)
    make_good_images(tmp_path / "test", 1)
    single = make_good_images(tmp_path / "loose", 1)[0]
    got = ids(iter_items([str(tmp_path / "train") + "/", str(tmp_path / "test"), str(single)]))
    t = str(tmp_path)
    assert got == [f"{t}/train/img0.png", f"{t}/train/img1.png", f"{t}/test/img0.png", str(single)]
    assert len(set(got)) == len(got)


def test_single_file_id_is_the_path_as_given(tmp_path, monkeypatch):
    make_good_images(tmp_path / "d", 1)
    monkeypatch.chdir(tmp_path)
    (item,) = iter_items(["./d/../d/img0.png"])
    assert item.id == "./d/../d/img0.png" and item.path == Path("./d/../d/img0.png")


def test_stdin_list(tmp_path):
    paths = make_good_images(tmp_path, 2)
    stdin = io.StringIO(f"{paths[0]}\n\n{paths[1]}\r\n{tmp_path}/missing.png\n")
    items = list(iter_items(["-"], stdin=stdin))
    assert ids(items) == [str(paths[0]), str(paths[1]), f"{tmp_path}/missing.png"]
    decoded = list(decode_stream(items))
    assert [d.error for d in decoded[:2]] == [None, None]
    assert decoded[2].error == "file not found"
    assert count_items(["-"]) is None


def test_missing_input_fails_before_anything_is_read(tmp_path):
    good = make_good_images(tmp_path, 1)[0]
    with pytest.raises(InputError, match="input not found: .*nope"):
        iter_items([str(good), str(tmp_path / "nope")])  # no next() needed: checked at call time
    with pytest.raises(InputError, match="no inputs"):
        iter_items([])


def test_bad_files_in_a_folder_become_per_item_errors(tmp_path):
    bad = make_bad_inputs(tmp_path / "bad")
    items = list(iter_items([str(tmp_path / "bad")]))
    by_name = {n: next(i for i in items if i.path == p) for n, p in bad.items()}
    assert "broken symlink" in by_name["broken_symlink"].error  # known before decoding
    decoded = {d.item.id: d for d in decode_stream(items, workers=3, prefetch=4)}
    for name, (kind, expected) in EXPECTED.items():
        d = decoded[by_name[name].id]
        if name == "unreadable" and os.geteuid() == 0:
            continue  # root reads it; covered by test_imageio's monkeypatched test
        if kind == "error":
            assert d.image is None and expected in d.error, (name, d.error)
        else:
            assert d.error is None and d.image.size == expected, (name, d.error)
    assert decoded[by_name["animated_gif"].id].info.frames == 3


def test_unlistable_directory_and_fifo_are_item_errors(tmp_path, monkeypatch):
    make_good_images(tmp_path / "d" / "locked", 1)
    make_good_images(tmp_path / "d" / "open", 1)
    os.mkfifo(tmp_path / "d" / "pipe.jpg")  # opening it for reading would block forever
    real = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = list(iter_items([str(tmp_path / "d")]))
    assert ids(items) == ["pipe.jpg", "locked/", "open/img0.png"]
    assert "cannot list directory (Permission denied)" in items[1].error
    errors = [d.error for d in decode_stream(items)]
    assert errors[0] == "not a regular file (FIFO)" and errors[2] is None


def test_parquet_layouts(pqv):
    hf = list(iter_items([str(pqv["hf_struct"])]))
    assert ids(hf) == [f"hf_struct.parquet#{r}" for r in range(3)]  # <file name>#<row>
    assert hf[1].meta == {"parquet": str(pqv["hf_struct"]), "row": 1, "column": "image", "cell_kind": "struct",
                          "base": "hf_struct.parquet"}
    assert hf[0].data[:4] == b"\x89PNG" and hf[0].path is None and hf[0].source == f"{pqv['hf_struct']}#0"
    (b0, *_) = iter_items([str(pqv["binary"])])
    assert b0.meta["cell_kind"] == "binary" and b0.meta["column"] == "img" and b0.data[:4] == b"\x89PNG"
    paths = list(iter_items([str(pqv["paths"])]))
    assert [i.path for i in paths] == [pqv["paths"].parent / "imgs" / f"p{k}.png" for k in range(2)]
    assert paths[0].meta["cell_kind"] == "path" and paths[0].meta["column"] == "file"
    only = list(iter_items([str(pqv["struct_path_only"])]))
    assert [i.path for i in only] == [i.path for i in paths] and only[0].data is None
    decoded = list(decode_stream(hf + paths + only))
    assert all(d.error is None and d.image.size == (20, 12) for d in decoded)
    assert decoded[1].image.getpixel((0, 0)) == (60, 0, 0)  # row 1 of hf_struct, not another row


def test_parquet_id_column_and_row_groups(pqv):
    assert ids(iter_items([str(pqv["ids"])], id_column="key")) == ["a", "b", "c"]
    items = list(iter_items([str(pqv["row_groups"])], batch_rows=2))
    assert [i.meta["row"] for i in items] == [0, 1, 2, 3, 4]
    colours = [d.image.getpixel((0, 0)) for d in decode_stream(items)]
    assert colours == [(i, i, i) for i in range(5)]
    with pytest.raises(InputError, match=r"id column 'nope' not found; columns: .*image"):
        iter_items([str(pqv["ids"])], id_column="nope")


def test_parquet_reads_only_needed_columns_lazily(pqv, monkeypatch):
    calls = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        calls.append(kw.get("columns"))
        for b in original(self, *a, **kw):
            calls.append("batch")
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    it = iter_items([str(pqv["row_groups"])], batch_rows=2)
    assert calls == []  # validating read the footer only
    next(it)
    assert calls == [["img"], "batch"]  # one batch so far, one column
    list(iter_items([str(pqv["hf_struct"])], id_column="label"))
    assert ["image", "label"] in calls


def test_parquet_null_and_bad_cells_are_per_item_errors(pqv):
    items = list(iter_items([str(pqv["null_cell"])]))
    assert items[0].error is None
    assert items[1].error == "null image cell (column 'image', row 1)"
    assert "empty image cell" in items[2].error and "row 2" in items[2].error
    errors = [d.error for d in decode_stream(items + list(iter_items([str(pqv["bad_bytes"])])))]
    assert errors[0] is None and errors[3] == "zero-byte image data"
    assert errors[4] is None and "truncated image data" in errors[5] and "not an image" in errors[6]


def test_wrong_column_type_and_missing_column_are_input_errors(pqv):
    with pytest.raises(InputError, match=r"int_image\.parquet: image column 'image' has type int64"):
        iter_items([str(pqv["int_image"])], image_column="image")
    with pytest.raises(InputError, match=r"no_image\.parquet: image column 'img' not found; columns: a \(int64\), b"):
        iter_items([str(pqv["no_image"])], image_column="img")
    with pytest.raises(InputError, match=r"no_image\.parquet: no image column found; columns: a \(int64\)"):
        iter_items([str(pqv["no_image"])])
    assert InputError("x").exit_code == 2


def test_bad_schema_inside_a_folder_is_that_files_error_record(tmp_path, pqv):
    d = tmp_path / "mixed"
    make_good_images(d, 2)
    (d / "z.parquet").write_bytes(pqv["no_image"].read_bytes())
    items = list(iter_items([str(d)]))  # the images are still scanned
    assert ids(items) == ["img0.png", "img1.png", "z.parquet"]
    assert items[2].error.endswith("z.parquet: no image column found; columns: a (int64), b (double); "
                                   "pass --image-column COL") and items[2].meta["parquet"] == str(d / "z.parquet")
    assert count_items([str(d)]) == 3
    with pytest.raises(InputError, match="z.parquet: no image column"):  # given directly: a usage error
        iter_items([str(d / "z.parquet")])


def test_truncated_parquet_is_one_error_record_and_the_run_goes_on(pqv, tmp_path):
    good = make_good_images(tmp_path, 1)[0]
    items = list(iter_items([str(pqv["truncated"]), str(good)]))
    assert ids(items) == ["truncated.parquet", str(good)]
    assert "cannot read Parquet file" in items[0].error
    assert [d.error is None for d in decode_stream(items)] == [False, True]


def test_parquet_inputs_sharing_a_file_name_keep_distinct_ids(tmp_path, pqv):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "data.parquet").write_bytes(pqv["binary"].read_bytes())
    one = str(tmp_path / "train" / "data.parquet")
    assert ids(iter_items([one]))[0] == "data.parquet#0"
    got = ids(iter_items([one, str(tmp_path / "test" / "data.parquet"), str(pqv["ids"])]))
    assert got[0] == f"{tmp_path}/train/data.parquet#0" and got[3] == f"{tmp_path}/test/data.parquet#0"
    assert got[6] == "ids.parquet#0" and len(set(got)) == 9


def test_column_detection(tmp_path):
    t = pa.table({"a": pa.array([b"x"], pa.binary()), "b": pa.array([b"y"], pa.binary())})
    pq.write_table(t, tmp_path / "two.parquet")
    with pytest.raises(InputError, match=r"several possible image columns \['a', 'b'\]"):
        iter_items([str(tmp_path / "two.parquet")])
    assert next(iter_items([str(tmp_path / "two.parquet")], image_column="b")).data == b"y"
    pq.write_table(t.append_column("image", pa.array([b"z"], pa.binary())), tmp_path / "three.parquet")
    assert next(iter_items([str(tmp_path / "three.parquet")])).data == b"z"
    pq.write_table(pa.table({"caption": ["a cat"], "file_name": ["cat.png"]}), tmp_path / "meta.parquet")
    assert next(iter_items([str(tmp_path / "meta.parquet")])).path == tmp_path / "cat.png"


def test_parquet_recognised_by_magic_and_in_folders(tmp_path, pqv):
    (tmp_path / "data.bin").write_bytes(pqv["binary"].read_bytes())
    assert next(iter_items([str(tmp_path / "data.bin")])).meta["cell_kind"] == "binary"
    d = tmp_path / "shards" / "train"
    d.mkdir(parents=True)
    (d / "0000.parquet").write_bytes(pqv["binary"].read_bytes())
    (tmp_path / "shards" / "0000.parquet").write_bytes(pqv["hf_struct"].read_bytes())
    got = ids(iter_items([str(tmp_path / "shards")]))
    assert got == [f"0000.parquet#{r}" for r in range(3)] + [f"train/0000.parquet#{r}" for r in range(3)]
    assert count_items([str(tmp_path / "shards"), str(pqv["truncated"])]) == 7


def test_count_items_matches_iteration(tmp_path, pqv):
    root = tree(tmp_path / "t")
    inputs = [str(root), str(pqv["row_groups"]), str(make_good_images(tmp_path, 1)[0])]
    assert count_items(inputs) == len(list(iter_items(inputs))) == 5 + 5 + 1


def test_parquet_streaming_memory_stays_flat(tmp_path, monkeypatch):
    import tracemalloc

    import guardalign.io.sources as sources

    rows, size = 400, 50_000  # 20 MB of image column in total
    # Seeded bytes behind a fixed text prefix: no Pillow plugin claims them (os.urandom once began with
    # 0x1C, which Pillow's IPTC plugin accepts, and the row read as a "corrupt header" instead).
    rng = random.Random(0)
    blobs = [b"not-an-image " + rng.randbytes(size) for _ in range(rows)]
    pq.write_table(pa.table({"img": pa.array(blobs, pa.binary())}), tmp_path / "big.parquet", row_group_size=50)
    monkeypatch.setattr(sources, "BATCH_BYTES", 1 << 20)  # ~20 rows per batch
    base, peak_arrow, n = pa.total_allocated_bytes(), 0, 0
    tracemalloc.start()
    try:
        for d in decode_stream(iter_items([str(tmp_path / "big.parquet")]), workers=2, prefetch=8):
            assert "not an image" in d.error
            peak_arrow = max(peak_arrow, pa.total_allocated_bytes() - base)
            n += 1
        _, peak_py = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == rows
    assert peak_py < 8 * 2**20 and peak_arrow < 10 * 2**20, (peak_py, peak_arrow)  # reading whole: > 20 MB each


def fake_items(n, counter=None):
    for i in range(n):
        if counter is not None:
            counter["pulled"] += 1
        yield Item(id=str(i), source=str(i), data=b"x", error="preset" if i % 7 == 3 else None)


def test_decode_stream_preserves_order_and_bounds_in_flight(monkeypatch):
    lock, state = threading.Lock(), {"now": 0, "max": 0, "pulled": 0}
    rng = random.Random(0)

    def fake_decode(data=None, path=None, max_pixels=None, name=None):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            delay = rng.random() * 0.004  # finish out of order
        time.sleep(delay)
        with lock:
            state["now"] -= 1
        return "img", None

    monkeypatch.setattr(imageio, "decode_image", fake_decode)
    out, ahead = [], []
    for d in decode_stream(fake_items(120, state), workers=3, prefetch=5):
        ahead.append(state["pulled"] - len(out))
        out.append(d)
    assert [d.item.id for d in out] == [str(i) for i in range(120)]
    assert all((d.error == "preset") == (int(d.item.id) % 7 == 3) for d in out)
    assert all(d.image == "img" for d in out if d.error is None)
    assert max(ahead) <= 5 and state["max"] <= 3


def test_decode_stream_is_lazy_and_closes_cleanly(monkeypatch):
    monkeypatch.setattr(imageio, "decode_image", lambda data=None, path=None, max_pixels=None, name=None: ("img", None))
    state = {"pulled": 0}
    before = threading.active_count()
    gen = decode_stream(fake_items(10**9, state), workers=2, prefetch=8)  # effectively endless
    first = [next(gen) for _ in range(50)]
    assert [d.item.id for d in first] == [str(i) for i in range(50)] and state["pulled"] <= 50 + 8
    gen.close()
    deadline = time.monotonic() + 10  # worker threads wind down promptly; allow for a loaded CI machine
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_decode_stream_turns_unexpected_exceptions_into_item_errors(monkeypatch):
    def boom(data=None, path=None, max_pixels=None, name=None):
        raise MemoryError("out of memory")

    monkeypatch.setattr(imageio, "decode_image", boom)
    (d,) = decode_stream([Item(id="a", source="a", data=b"x")])
    assert isinstance(d, Decoded) and d.image is None and "MemoryError" in d.error
    with pytest.raises(ConfigError, match="expected a positive number"):  # a GuardalignError: exit 2
        next(decode_stream([], prefetch=0))
