"""mask --engine ray on a real local Ray cluster: the same purified files, Parquet and tar shards as a local run."""
from __future__ import annotations

import json
import tarfile
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
    """Manifest entries, the overlay folder in their settings (``<out>.overlays``, which names the out dir) aside."""
    out = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    for e in out:
        assert e["settings"]["overlay"] in (None, str(root.with_name(root.name + ".overlays")))
        e["settings"]["overlay"] = e["settings"]["overlay"] is not None
    return out


def test_ray_mask_writes_what_a_local_mask_writes(ray_cluster, flags, tmp_path):
    data = tmp_path / "data"
    make_good_images(data / "imgs", n=2, size=(48, 40))
    (data / "imgs" / "bad.png").write_bytes(b"not an image")
    image_parquet(data / "p.parquet", 4, group=2)
    good_shard(data / "shards" / "a.tar", n=2)
    write_tar(data / "shards" / "b.tar", [("x.png", image_bytes(5)), ("y.png", image_bytes(6)), ("x.txt", b"late"),
                                          ("z.tga", image_bytes(7, "TGA", size=(40, 30)))])
    inputs = [str(data / "imgs"), str(data / "p.parquet"), str(data / "shards")]
    opts = dict(tau=1.5, fill="black", overlay=True, **flags)
    local = guardalign.mask(inputs, out_dir=str(tmp_path / "local"), **opts)
    remote = guardalign.mask(inputs, out_dir=str(tmp_path / "ray"), engine="ray", **opts)
    assert entries(tmp_path / "ray") == entries(tmp_path / "local")  # same entries, same order
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")  # byte-identical outputs
    assert tree(tmp_path / "ray.overlays") == tree(tmp_path / "local.overlays") != {}  # and overlays
    out = tree(tmp_path / "ray")
    assert "p.parquet" in out and {"shards/a.tar", "shards/b.tar"} <= {k[-12:] for k in out}
    tga = next(e for e in entries(tmp_path / "ray") if e["id"].endswith("b.tar#z"))  # no magic bytes: told by name
    assert tga["status"] == "purified"
    with tarfile.open(tmp_path / "ray" / tga["output"]) as tf:
        assert tf.getnames() == ["y.png", "z.png"]  # x (keys not grouped) left out; the TGA written back as PNG
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
