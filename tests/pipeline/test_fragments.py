"""guardalign.pipeline.fragments: the Ray engine's unit of work gives exactly the local engine's items."""
from __future__ import annotations

import os
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badinputs import make_good_images
from guardalign.errors import ConfigError, InputError
from guardalign.io.sources import iter_items
from guardalign.pipeline.fragments import Fragment, expand, items, plan
from shards import good_shard, image_parquet as write_parquet


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "data"
    make_good_images(root, n=3)
    make_good_images(root / "sub", n=2, ext=".jpg")
    write_parquet(root / "sub" / "rows.parquet", 7)
    good_shard(root / "shards" / "s0.tar", n=2)
    os.symlink(root / "missing.png", root / "broken.png")
    make_good_images(root / "zz", n=1)
    return root


def flat(frags):
    return [i for f in frags for i in items(f)]


def same(a, b, source=True):
    assert [(i.id, i.error, i.data) for i in a] == [(i.id, i.error, i.data) for i in b]
    if source:
        assert [i.source for i in a] == [i.source for i in b]


def test_fragments_give_the_local_items_in_order(tree, tmp_path):
    loose = make_good_images(tmp_path / "loose", n=1)[0]
    pq_file = write_parquet(tmp_path / "top.parquet", 5, group=2)
    inputs = [str(tree), str(loose), str(pq_file)]
    frags = plan(inputs, fragment_rows=4)
    same(flat(frags), list(iter_items(inputs)))
    kinds = [f.kind for f in frags]
    assert kinds.count("tar") == 1 and "files" in kinds
    # row groups are never split, fragments stay near the limit, and the row ranges tile the file
    top = [f for f in frags if f.path == str(pq_file)]
    assert [f.groups for f in top] == [(0, 1), (2,)] and [f.first_row for f in top] == [0, 4]
    assert len({f.key for f in frags}) == len(frags)
    assert all(Fragment.from_dict(f.to_dict()) == f for f in frags)


def test_file_uris_and_globs_read_through_pyarrow(tree, tmp_path):
    (tree / "broken.png").unlink()  # object stores have no symlinks; pyarrow lists none
    uri = f"file://{tree}"
    frags = plan([uri], fragment_rows=100)
    got = flat(frags)
    want = [i if i.data is not None else replace(i, data=i.path.read_bytes()) for i in iter_items([str(tree)])]
    same(got, want, source=False)  # same ids, errors and bytes (read through pyarrow); sources name the URI
    assert got[0].source == f"{uri}/img0.png" and got[0].data is not None
    parquet_rows = [i for i in got if "parquet" in i.meta]
    assert parquet_rows[0].source == f"{uri}/sub/rows.parquet#0"
    write_parquet(tmp_path / "g" / "a.parquet", 2)
    write_parquet(tmp_path / "g" / "b.parquet", 2)
    assert expand([f"file://{tmp_path}/g/*.parquet"]) == [f"file://{tmp_path}/g/a.parquet",
                                                           f"file://{tmp_path}/g/b.parquet"]
    assert expand([f"{tmp_path}/g/*.parquet"]) == [f"{tmp_path}/g/a.parquet", f"{tmp_path}/g/b.parquet"]
    ids = [i.id for i in flat(plan([f"file://{tmp_path}/g/*.parquet"]))]
    assert ids == ["a.parquet#0", "a.parquet#1", "b.parquet#0", "b.parquet#1"]


def test_planning_refuses_what_cannot_run(tmp_path):
    with pytest.raises(InputError, match="matches nothing"):
        plan([f"{tmp_path}/*.parquet"])
    with pytest.raises(InputError, match="not found"):
        plan([f"file://{tmp_path}/nope.parquet"])
    with pytest.raises(ConfigError, match="stdin"):
        plan(["-"])
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), bad)
    with pytest.raises(InputError, match="no image column"):
        plan([str(bad)])
    with pytest.raises(InputError, match="no image column"):
        plan([f"file://{bad}"])


def test_a_changed_input_changes_the_stamp(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", 2)
    before = plan([str(p)])[0].stamp
    write_parquet(p, 3)
    os.utime(p, ns=(1, 1))
    assert plan([str(p)])[0].stamp != before
