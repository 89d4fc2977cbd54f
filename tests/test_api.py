"""The public library API: ``guardalign.<command>(...)`` works any number of times in one process."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import guardalign


def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def clip_flags(tiny_clip_config, tiny_clip_checkpoint):
    return {"clip_model": str(tiny_clip_config), "pretrained": str(tiny_clip_checkpoint), "device": "cpu"}


def test_entry_points_are_the_functions_every_time():
    import guardalign.commands.scan  # noqa: F401  (importing the module must not shadow the function)

    for name in ("scan", "mask", "answer", "calibrate", "report", "probe"):
        first, second = getattr(guardalign, name), getattr(guardalign, name)
        assert callable(first) and first is second and first.__name__ == name, name
    assert set(("scan", "calibrate")) <= set(dir(guardalign))
    with pytest.raises(AttributeError):
        guardalign.no_such_command  # noqa: B018


def test_scan_mask_calibrate_report_twice_in_one_process(tmp_path, clip_flags):
    imgs = _images(tmp_path / "imgs")
    for run in range(2):
        out = tmp_path / f"scan{run}.jsonl"
        s = guardalign.scan([str(imgs)], out=str(out), tau=2.0, progress=False, **clip_flags)
        assert (s.total, s.unsafe, s.exit_code) == (3, 3, 0)
        m = guardalign.mask([str(imgs)], out_dir=str(tmp_path / f"clean{run}"), from_scan=str(out), progress=False,
                            **clip_flags)
        assert (m.purified, m.exit_code) == (3, 0)
        labelled = tmp_path / "labelled.jsonl"
        labelled.write_text("".join(json.dumps({"image": f"imgs/{i}.png", "label": "unsafe" if i else "safe"}) + "\n"
                                    for i in range(3)))
        c = guardalign.calibrate(str(labelled), progress=False, bootstrap=10, **clip_flags)
        assert c.chosen is not None and c.exit_code == 0
        html = tmp_path / f"report{run}.html"
        guardalign.report([str(out)], out=str(html))
        assert html.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.slow
def test_answer_twice_in_one_process(tmp_path, clip_flags):
    from lvlm_fixtures import make_tiny_lvlm

    model = make_tiny_lvlm("llava", tmp_path / "llava")
    _images(tmp_path / "imgs", 1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "image": "imgs/0.png", "prompt": "What is this?"}) + "\n")
    for run in range(2):
        s = guardalign.answer(str(prompts), model=str(model), out=str(tmp_path / f"a{run}.jsonl"), device="cpu",
                              max_new_tokens=2, progress=False, **{k: v for k, v in clip_flags.items() if k != "device"})
        assert (s.total, s.ok, s.exit_code) == (1, 1, 0)
