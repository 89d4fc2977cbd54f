"""mask --engine ray on a real local Ray cluster: the same purified files, Parquet and tar shards as a local run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import guardalign
from badinputs import make_good_images
from shards import good_shard, image_bytes, image_parquet, write_tar

pytestmark = pytest.mark.slow
BOOKKEEPING = {"manifest.jsonl", "manifest.json", ".lock"}


@pytest.fixture(scope="module")
def flags(tiny_clip_config, tiny_clip_checkpoint):
    return {"clip_model": str(tiny_clip_config), "pretrained": str(tiny_clip_checkpoint), "device": "cpu",
            "batch_size": 1, "progress": False}


def tree(root: Path) -> dict[str, bytes]:
    """Every output file (bookkeeping left out) → its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in BOOKKEEPING and not p.relative_to(root).parts[0].startswith("_")}


def entries(root: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items()} for x in (root / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.xfail(reason="known bug (issue 15, open): after the faults merge, images inside tar shards are decoded by content only, so a TGA member (no magic bytes) becomes an error record, and Ray mask's error record for a non-image differs from the local one", strict=False)
def test_ray_mask_writes_what_a_local_mask_writes(ray_cluster, flags, tmp_path):
    data = tmp_path / "data"
    make_good_images(data / "imgs", n=2, size=(48, 40))
    (data / "imgs" / "bad.png").write_bytes(b"not an image")
    image_parquet(data / "p.parquet", 4, group=2)
    good_shard(data / "shards" / "a.tar", n=2)
    write_tar(data / "shards" / "b.tar", [("x.png", image_bytes(5)), ("y.png", image_bytes(6)), ("x.txt", b"late")])
    inputs = [str(data / "imgs"), str(data / "p.parquet"), str(data / "shards")]
    opts = dict(tau=1.5, fill="black", overlay=True, **flags)
    local = guardalign.mask(inputs, out_dir=str(tmp_path / "local"), **opts)
    remote = guardalign.mask(inputs, out_dir=str(tmp_path / "ray"), engine="ray", **opts)
    assert entries(tmp_path / "ray") == entries(tmp_path / "local")  # same entries, same order
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")  # byte-identical outputs, overlays included
    out = tree(tmp_path / "ray")
    assert "p.parquet" in out and {"shards/a.tar", "shards/b.tar"} <= {k[-12:] for k in out}
    assert (remote.purified, remote.copied, remote.errors, remote.exit_code) == \
           (local.purified, local.copied, local.errors, local.exit_code)
    assert remote.purified > 0 and remote.exit_code == 3
    # a rerun finds every fragment done and changes nothing
    again = guardalign.mask(inputs, out_dir=str(tmp_path / "ray"), engine="ray", **opts)
    assert (again.resumed, again.processed, again.total) == (remote.total, 0, remote.total)
    assert tree(tmp_path / "ray") == out
    # --from-scan on Ray: no model actors, the scan's verdicts reused, the same outputs as a local --from-scan
    scan = tmp_path / "scan.jsonl"
    guardalign.scan(inputs, out=str(scan), tau=1.5, **flags)
    kw = {k: v for k, v in opts.items() if k != "tau"}
    guardalign.mask(inputs, out_dir=str(tmp_path / "fs-local"), from_scan=str(scan), **kw)
    guardalign.mask(inputs, out_dir=str(tmp_path / "fs-ray"), from_scan=str(scan), engine="ray", **kw)
    assert entries(tmp_path / "fs-ray") == entries(tmp_path / "fs-local")
    assert tree(tmp_path / "fs-ray") == tree(tmp_path / "fs-local")
