"""The Ray engine's worker code run in-process (no cluster): read/decode blocks and the model actor."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from guardalign.commands.scan import scan
from guardalign.errors import ConfigError
from guardalign.pipeline.fragments import plan
from guardalign.pipeline.ray_engine import DetectActor, read_decode
from shards import good_shard, write_tar, image_bytes


@pytest.fixture()
def options(tiny_clip_config, tiny_clip_checkpoint):
    return {"clip_model": str(tiny_clip_config), "pretrained": str(tiny_clip_checkpoint), "device": "cpu",
            "batch_size": 1}


def test_blocks_and_actor_records_are_the_local_records(tmp_path, options):
    shard = write_tar(tmp_path / "s.tar", [("a.png", image_bytes(1)), ("b.png", image_bytes(2)),
                                           ("c.json", b"{}"), ("d.png", image_bytes(3))])
    frag = plan([str(shard)])[0]
    batch = pa.table({"frag": [7], "fragment": [json.dumps(frag.to_dict())]})
    blocks = list(read_decode(batch, image_column=None, id_column=None, block_rows=2))
    rows = [r for b in blocks for r in b.to_pylist()]
    assert [(r["frag"], r["pos"], r["end"]) for r in rows] == [(7, 0, -1), (7, 1, -1), (7, 2, -1), (7, 3, -1),
                                                               (7, 4, 4)]  # 4 items, then the sentinel
    assert rows[2]["error"] and rows[2]["pixels"] is None and rows[0]["width"] == 24
    actor = DetectActor(options, "jsonl", settings=_settings(options))
    out = [r for b in blocks for r in actor(b).to_pylist()]
    assert [r["payload"] is None for r in out] == [False] * 4 + [True]
    local = tmp_path / "local.jsonl"
    scan([str(shard)], out=str(local), progress=False, **options)
    strip = lambda rec: {k: v for k, v in rec.items() if k != "elapsed_s"}  # noqa: E731
    want = [strip(json.loads(x)) for x in local.read_text().splitlines()]
    assert [strip(json.loads(r["payload"])) for r in out[:4]] == want
    assert [(r["id"], r["status"]) for r in out[:4]] == [(w["id"], w["status"]) for w in want]


def test_an_actor_whose_detector_differs_from_the_drivers_refuses_to_start(options):
    other = {**_settings(options), "tau": 0.5}
    with pytest.raises(ConfigError, match=r"other settings than the driver: tau: 0\.5 → null"):
        DetectActor(options, "parquet", settings=other)


def _settings(options):
    from guardalign.detection.detector import Detector

    return Detector.from_options(**options).settings()


def test_a_fragment_of_files_streams_in_blocks(tmp_path, options):
    from badinputs import make_good_images

    make_good_images(tmp_path / "imgs", n=5)
    good_shard(tmp_path / "imgs" / "s.tar", n=1)
    frags = plan([str(tmp_path / "imgs")])
    assert [f.kind for f in frags] == ["files", "tar"]
    batch = pa.table({"frag": [0], "fragment": [json.dumps(frags[0].to_dict())]})
    sizes = [b.num_rows for b in read_decode(batch, image_column=None, id_column=None, block_rows=2)]
    assert sizes == [2, 2, 2]  # blocks of 2 decoded items; the last one carries the sentinel


@pytest.mark.slow
def test_cpu_actors_take_the_drivers_detector_rather_than_load_their_own(ray_cluster, options):
    """The driver's copy travels through the object store once; an actor that cannot fetch it loads the model."""
    import torch

    from guardalign.detection.detector import Detector
    from guardalign.pipeline.ray_engine import OFFERED, actor_options

    driver = Detector.from_options(**options)
    with torch.no_grad():
        driver.encoder.model.visual.proj.mul_(2.0)  # a mark no freshly loaded model has
    assert OFFERED not in actor_options(options, driver, "cuda")  # a GPU actor loads on its own device
    offered = actor_options(options, driver, "cpu")
    built = {k: v for k, v in offered.items() if k != OFFERED}
    ref = ray_cluster.put(offered[OFFERED].take())
    assert offered[OFFERED].take() is None  # taken once: the driver keeps no reference
    mark = driver.encoder.model.visual.proj
    actor = DetectActor(built, "jsonl", settings=driver.settings(), detector=(ref,))
    assert torch.equal(actor.stage.detector.encoder.model.visual.proj, mark)
    fallback = DetectActor(built, "jsonl", settings=driver.settings(), detector=(None,))  # nothing to fetch
    assert torch.equal(fallback.stage.detector.encoder.model.visual.proj * 2.0, mark)


def test_a_ray_started_for_the_run_runs_its_workers_at_a_local_runs_priority(monkeypatch):
    """Ray's default worker niceness (15) would let any other job take the CPU from the actors, not from a local run."""
    import os

    from guardalign.pipeline.ray_engine import NICENESS, init_ray

    seen = []

    class FakeRay:
        def init(self, **kwargs):
            seen.append((os.environ.get(NICENESS), kwargs["address"], kwargs["include_dashboard"], kwargs["num_cpus"]))

    monkeypatch.delenv(NICENESS, raising=False)
    init_ray(FakeRay(), None, num_cpus=2)
    assert seen[-1] == ("0", None, False, 2) and NICENESS not in os.environ  # set for the raylet's start only
    monkeypatch.setenv(NICENESS, "7")  # the user's own setting wins, and stays
    init_ray(FakeRay(), "head:6379", num_cpus=1)
    assert seen[-1] == ("7", "head:6379", False, 1) and os.environ[NICENESS] == "7"
