"""Tests for guardalign.models.clip: loading paths, errors, preprocessing, grid and dense patches."""
from __future__ import annotations

import json
import pathlib
import socket
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from guardalign.models.clip import (
    PatchBatch,
    _value_path,
    grid_boxes,
    load_encoder,
    n_windows,
    save_checkpoint,
)
from guardalign.errors import ConfigError, ModelLoadError


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _coverage(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """How many boxes cover each pixel, (H, W)."""
    count = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in boxes:
        count[y0:y1, x0:x1] += 1
    return count


def _random_tiny(config, seed: int):
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore")
        return load_encoder(str(config), "none", device="cpu")


# ---- loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_roundtrip_gives_identical_embeddings(tiny_clip_config, tmp_path, suffix):
    built = _random_tiny(tiny_clip_config, seed=123)
    path = save_checkpoint(built.model, tmp_path / f"ckpt{suffix}")
    assert path.is_file() and not list(tmp_path.glob(".*tmp"))
    loaded = load_encoder(str(tiny_clip_config), str(path), device="cpu")
    assert loaded.name == f"tiny-clip.json:{path.resolve()}"
    assert loaded.logit_scale == pytest.approx(built.logit_scale)
    texts = ["a photo of a cat", "a gun on a table"]
    assert torch.equal(built.encode_text(texts), loaded.encode_text(texts))
    pixels = loaded.preprocess([_noise(80, 50), _noise(64, 64, seed=1)])
    a, b = built.encode_images(pixels), loaded.encode_images(pixels)
    assert torch.equal(a, b)
    # a differently seeded model gives different embeddings, so the equality above is not vacuous
    assert not torch.allclose(_random_tiny(tiny_clip_config, seed=7).encode_images(pixels), a)


def test_pt_checkpoint_is_a_plain_state_dict(tiny_encoder, tmp_path):
    path = save_checkpoint(tiny_encoder.model, tmp_path / "sub" / "m.pt")
    state = torch.load(path, weights_only=True)
    assert set(state) == set(tiny_encoder.model.state_dict())


def test_checkpoint_under_state_dict_key_loads(tiny_clip_config, tiny_encoder, tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": tiny_encoder.model.state_dict()}, path)
    loaded = load_encoder(str(tiny_clip_config), str(path), device="cpu")
    assert torch.equal(loaded.encode_text(["x"]), tiny_encoder.encode_text(["x"]))


def test_pretrained_none_warns_loudly_in_one_line(tiny_clip_config, capsys, recwarn):
    enc = load_encoder(str(tiny_clip_config), "none", device="cpu")
    assert enc.name == "tiny-clip.json:none"
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("warning: CLIP model tiny-clip.json runs with RANDOM weights")
    assert "UserWarning" not in err and "clip.py" not in err  # no Python warning display, no source line
    assert not [w for w in recwarn if "RANDOM" in str(w.message)]  # and no Python warning to filter


def test_pretrained_none_warning_through_the_cli_is_one_stderr_line(tiny_clip_config, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cli.main import app

    Image.new("RGB", (20, 12), (10, 20, 30)).save(tmp_path / "a.png")
    res = CliRunner().invoke(app, ["scan", str(tmp_path / "a.png"), "--clip-model", str(tiny_clip_config),
                                   "--pretrained", "none", "--device", "cpu", "-q", "--out", str(tmp_path / "s.jsonl")])
    assert res.exit_code == 0, res.output
    random_lines = [line for line in res.stderr.splitlines() if "RANDOM" in line]
    assert len(random_lines) == 1 and random_lines[0].startswith("warning: ")
    assert "UserWarning" not in res.stderr and "warn(" not in res.stderr


def test_offline_default_raises_model_load_error_quickly(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    for var, value in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                       "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "XDG_CACHE_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("the loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_encoder("ViT-B-32", "openai", device="cpu")
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "--pretrained" in message and "ViT-B-32" in message and "--clip-model" in message
    assert "Traceback" not in message and len(message.splitlines()) <= 6 and info.value.__cause__ is None


def test_unknown_model_name(tiny_clip_config):
    with pytest.raises(ModelLoadError, match="Unknown CLIP model 'ViT-B-33'.*ViT-B-32"):
        load_encoder("ViT-B-33", "openai", device="cpu")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ModelLoadError, match="not-a-tag.*known tags:.*openai") as info:
        load_encoder("ViT-B-32", "not-a-tag", device="cpu")
    assert "--pretrained" in str(info.value)


def test_missing_checkpoint_file(tiny_clip_config, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelLoadError, match="not found") as info:
        load_encoder(str(tiny_clip_config), str(missing), device="cpu")
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_corrupt_checkpoint(tiny_clip_config, tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    with pytest.raises(ModelLoadError, match="corrupt") as info:
        load_encoder(str(tiny_clip_config), str(bad), device="cpu")
    assert str(bad) in str(info.value) and info.value.__cause__ is None


class _Payload:
    """Unpickling this touches a marker file: what a bare ``torch.load`` of a hostile file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_refused(tiny_clip_config, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, path)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_encoder(str(tiny_clip_config), str(path), device="cpu")
    assert not marker.exists()  # weights_only=True never ran the payload


def test_checkpoint_of_another_architecture(tiny_clip_config, tiny_clip_checkpoint, tmp_path):
    cfg = json.loads(tiny_clip_config.read_text())
    cfg["embed_dim"] = 16
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_encoder(str(other), str(tiny_clip_checkpoint), device="cpu")


@pytest.mark.parametrize("content", ["{not json", '{"embed_dim": 8}', "[1, 2]"])
def test_bad_config_json(tmp_path, content):
    path = tmp_path / "cfg.json"
    path.write_text(content)
    with pytest.raises(ModelLoadError, match="cfg.json"):
        load_encoder(str(path), "none", device="cpu")


def test_missing_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_encoder(str(tmp_path / "absent.json"), "none", device="cpu")


def test_model_cfg_wrapper_with_preprocess_cfg(tiny_clip_config, tiny_clip_checkpoint, tmp_path):
    wrapped = tmp_path / "open_clip_config.json"
    wrapped.write_text(json.dumps({"model_cfg": json.loads(tiny_clip_config.read_text()),
                                   "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    enc = load_encoder(str(wrapped), str(tiny_clip_checkpoint), device="cpu")
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.25, 0.25, 0.25)


def test_bad_device_and_precision(tiny_clip_config, tiny_clip_checkpoint):
    with pytest.raises(ConfigError, match="precision"):
        load_encoder(str(tiny_clip_config), str(tiny_clip_checkpoint), device="cpu", precision="fp8")
    with pytest.raises(ConfigError, match="device"):
        load_encoder(str(tiny_clip_config), str(tiny_clip_checkpoint), device="tpu:9")


def test_half_precision_on_cpu_warns_and_stays_fp32(tiny_clip_config, tiny_clip_checkpoint):
    with pytest.warns(UserWarning, match="fp32"):
        enc = load_encoder(str(tiny_clip_config), str(tiny_clip_checkpoint), device="cpu", precision="fp16")
    assert enc.dtype == torch.float32 and enc.model.visual.conv1.weight.dtype == torch.float32


def test_low_precision_model_gets_matching_pixels(tiny_clip_config, tiny_encoder):
    """open_clip's bf16 cast keeps some tensors fp32; pixels must follow the conv weights (CPU stand-in for CUDA)."""
    import open_clip

    from guardalign.models.clip import ClipEncoder
    from guardalign.models.clip_weights import register_config_json

    arch, _ = register_config_json(tiny_clip_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(arch, precision="bf16", device="cpu")
    model.load_state_dict(tiny_encoder.model.state_dict())
    enc = ClipEncoder(model, tiny_encoder.tokenizer, name="bf16", device="cpu")
    assert enc.dtype == torch.bfloat16
    images = [_noise(101, 37)]
    dense, reference = enc.dense_patches(images), tiny_encoder.dense_patches(images)
    assert dense.patch_emb.dtype == torch.float32
    assert torch.allclose(dense.patch_emb, reference.patch_emb, atol=3e-2)
    assert torch.allclose(dense.global_emb, enc.encode_images(enc.preprocess(images)), atol=1e-6)
    assert torch.allclose(enc.grid_patches(images, 2).patch_emb, tiny_encoder.grid_patches(images, 2).patch_emb,
                          atol=3e-2)


# ---- text and preprocessing ---------------------------------------------------------------------
def test_text_embeddings_normalised_and_cached(tiny_encoder):
    first = tiny_encoder.encode_text(["a knife", "a flower", "a knife"])
    assert first.shape == (3, 32) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(first[0], first[2]) and not torch.allclose(first[0], first[1])
    assert tiny_encoder.encode_text(("a knife", "a flower", "a knife")) is first
    assert tiny_encoder.encode_text(["a flower"]) is not first
    assert torch.allclose(tiny_encoder.encode_text(["a flower"])[0], first[1], atol=1e-6)


def test_preprocess_squash_resizes_and_normalises(tiny_encoder):
    mean_rgb = tuple(round(m * 255) for m in tiny_encoder.mean)
    flat = Image.new("RGB", (100, 30), mean_rgb)
    gray = Image.new("L", (30, 90), 255)
    pixels = tiny_encoder.preprocess([flat, gray])
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == torch.float32
    assert pixels[0].abs().max() < 1 / 255 / min(tiny_encoder.std)  # mean colour → ≈ 0
    expected_white = (1 - torch.tensor(tiny_encoder.mean)) / torch.tensor(tiny_encoder.std)
    assert torch.allclose(pixels[1].mean(dim=(1, 2)), expected_white, atol=1e-5)


def test_encode_images_normalised(tiny_encoder):
    emb = tiny_encoder.encode_images(tiny_encoder.preprocess([_noise(64, 64), _noise(20, 70, 3)]))
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


# ---- grid patches -----------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(64, 64), (101, 37), (37, 101), (7, 5), (640, 481)])
@pytest.mark.parametrize("grid", [1, 2, 3, 4, 7])
def test_grid_boxes_tile_the_image(width, height, grid):
    boxes = grid_boxes(width, height, grid)
    assert boxes.shape == (grid * grid, 4) and boxes.dtype == np.int64
    coverage = _coverage(boxes, width, height)
    if width >= grid and height >= grid:
        assert (coverage == 1).all()  # union = image, no overlap
    else:  # fewer pixels than windows: windows keep ≥ 1 px and overlap
        assert (coverage >= 1).all() and ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()
        return
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert widths.max() - widths.min() <= 1 and heights.max() - heights.min() <= 1
    # row-major order: first row left to right
    assert (boxes[:grid, 1] == 0).all() and (np.diff(boxes[:grid, 0]) > 0).all()


@pytest.mark.parametrize("width,height", [(64, 64), (101, 37), (300, 200)])
@pytest.mark.parametrize("grid,stride", [(3, 0.5), (2, 0.5), (4, 0.75), (3, 1 / 3)])
def test_overlapping_grid_covers_the_image(width, height, grid, stride):
    n = n_windows(grid, stride)
    assert n == int(np.ceil((grid - 1) / stride - 1e-9)) + 1
    boxes = grid_boxes(width, height, grid, stride=stride)
    assert boxes.shape == (n * n, 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (_coverage(boxes, width, height) >= 1).all()
    assert abs((boxes[:, 2] - boxes[:, 0]).mean() - width / grid) <= 1  # windows keep 1/grid of the side
    starts = np.unique(boxes[:, 0])
    assert starts[0] == 0 and boxes[:, 2].max() == width
    assert np.diff(starts).max() <= stride * width / grid + 1  # step at most stride × window


def test_grid_patches_encode_each_crop(tiny_encoder):
    images = [_noise(101, 37), _noise(50, 80, 1).convert("L")]
    batch = tiny_encoder.grid_patches(images, grid=3)
    assert isinstance(batch, PatchBatch) and batch.grid == (3, 3)
    assert batch.patch_emb.shape == (2, 9, 32) and batch.global_emb.shape == (2, 32)
    assert torch.allclose(batch.patch_emb.norm(dim=-1), torch.ones(2, 9), atol=1e-5)
    for image, boxes in zip(images, batch.boxes):
        assert (_coverage(boxes, image.width, image.height) == 1).all()
    # independent: crop with PIL, preprocess, encode one at a time
    image, box = images[0], batch.boxes[0][4]
    crop = tiny_encoder.encode_images(tiny_encoder.preprocess([image.crop(tuple(int(v) for v in box))]))
    assert torch.allclose(batch.patch_emb[0, 4], crop[0], atol=1e-5)
    whole = tiny_encoder.encode_images(tiny_encoder.preprocess(images))
    assert torch.allclose(batch.global_emb, whole, atol=1e-5)


def test_grid_patches_multiscale_and_overlap(tiny_encoder):
    batch = tiny_encoder.grid_patches([_noise(90, 60)], grid=3, stride=0.5, scales=(2, 3))
    n = n_windows(3, 0.5)
    assert batch.grid == (n, n)
    assert batch.patch_emb.shape == (1, n * n + n_windows(2, 0.5) ** 2, 32)
    assert len(batch.boxes[0]) == batch.patch_emb.shape[1]
    assert (_coverage(batch.boxes[0][n * n:], 90, 60) >= 1).all()


def test_grid_patches_chunks_large_batches(tiny_encoder, monkeypatch):
    images = [_noise(40, 40, s) for s in range(3)]
    reference = tiny_encoder.grid_patches(images, grid=2)
    monkeypatch.setattr(tiny_encoder, "max_batch", 4)  # 15 crops → 4 chunks
    chunked = tiny_encoder.grid_patches(images, grid=2)
    assert torch.allclose(reference.patch_emb, chunked.patch_emb, atol=1e-6)


def test_grid_patches_rejects_bad_arguments(tiny_encoder):
    with pytest.raises(ConfigError, match="stride"):
        tiny_encoder.grid_patches([_noise(10, 10)], grid=2, stride=0)
    with pytest.raises(ConfigError, match="grid"):
        tiny_encoder.grid_patches([_noise(10, 10)], grid=0)


def test_empty_image_list(tiny_encoder):
    grid = tiny_encoder.grid_patches([], grid=3)
    dense = tiny_encoder.dense_patches([])
    assert grid.patch_emb.shape == (0, 9, 32) and dense.patch_emb.shape == (0, 16, 32)
    assert grid.boxes == [] and dense.global_emb.shape == (0, 32)


# ---- dense patches ----------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(64, 64), (101, 37), (3, 2)])
def test_dense_boxes_tile_and_shapes(tiny_encoder, width, height):
    batch = tiny_encoder.dense_patches([_noise(width, height)])
    assert batch.grid == (4, 4)
    assert batch.patch_emb.shape == (1, 16, 32)
    assert torch.allclose(batch.patch_emb.norm(dim=-1), torch.ones(1, 16), atol=1e-5)
    boxes = batch.boxes[0]
    assert boxes.shape == (16, 4)
    if width >= 4 and height >= 4:
        assert (_coverage(boxes, width, height) == 1).all()
        # token (r, c) covers rows r·H/4 .. (r+1)·H/4 (rounded)
        def half_up(v):
            return int(np.floor(v + 0.5))

        assert boxes[5].tolist() == [half_up(width / 4), half_up(height / 4), half_up(2 * width / 4),
                                     half_up(2 * height / 4)]
    else:
        assert (_coverage(boxes, width, height) >= 1).all()


def test_dense_global_equals_encode_images(tiny_encoder):
    images = [_noise(101, 37), _noise(64, 64, 5), _noise(30, 90, 6)]
    batch = tiny_encoder.dense_patches(images)
    reference = tiny_encoder.encode_images(tiny_encoder.preprocess(images))
    assert torch.allclose(batch.global_emb, reference, atol=1e-6)


def test_dense_value_path_matches_self_attention(tiny_encoder):
    """Independent check: out_proj(v) is the last block's attention when each token sees only itself."""
    image = _noise(64, 64, 9)
    visual = tiny_encoder.model.visual
    pixels = tiny_encoder.preprocess([image])
    with torch.no_grad():
        inter = visual.forward_intermediates(pixels, indices=[len(visual.transformer.resblocks) - 2],
                                             output_fmt="NLC", output_extra_tokens=True)
        x = torch.cat([inter["image_intermediates_prefix"][0], inter["image_intermediates"][0]], dim=1)
        last = visual.transformer.resblocks[-1]
        y = last.ln_1(x)
        length = y.shape[1]
        only_self = torch.full((length, length), float("-inf")).fill_diagonal_(0.0)
        attended = last.attn(y, y, y, need_weights=False, attn_mask=only_self)[0]
        assert torch.allclose(_value_path(last, y), attended, atol=1e-5)
        expected = F.normalize(visual.ln_post(attended[:, 1:]) @ visual.proj, dim=-1)
    got = tiny_encoder.dense_patches([image]).patch_emb
    assert torch.allclose(got, expected, atol=1e-5)
    # and it is not simply the normal output tokens of the last block
    normal = F.normalize(visual.ln_post(last(x)[:, 1:]) @ visual.proj, dim=-1)
    assert not torch.allclose(got, normal, atol=1e-3)


def test_dense_custom_blocks_and_avg_pool(tiny_clip_config, tmp_path):
    """open_clip's custom attention block (head scale, inner/post norms, layer scale) and mean pooling."""
    cfg = json.loads(tiny_clip_config.read_text())
    cfg["vision_cfg"].update(scale_heads=True, scale_attn_inner=True, scale_attn=True, ls_init_value=0.5,
                             pool_type="avg")
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(cfg))
    enc = _random_tiny(path, seed=3)
    visual = enc.model.visual
    last = visual.transformer.resblocks[-1]
    assert type(last).__name__ == "CustomResidualAttentionBlock"
    with torch.no_grad():  # move the identity-initialised extras away from identity
        for name, param in last.named_parameters():
            if "head_scale" in name or "ln_inner" in name or "ln_attn" in name or "ls_1" in name:
                param.add_(torch.randn_like(param) * 0.3)
    images = [_noise(101, 37), _noise(64, 64, 2)]
    batch = enc.dense_patches(images)
    assert torch.allclose(batch.global_emb, enc.encode_images(enc.preprocess(images)), atol=1e-6)
    y = torch.randn(2, 17, 64)
    only_self = torch.full((17, 17), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        attended = last.ls_1(last.ln_attn(last.attn(y, attn_mask=only_self)))
        assert torch.allclose(_value_path(last, y), attended, atol=1e-5)


def test_dense_patches_are_batch_independent(tiny_encoder, monkeypatch):
    images = [_noise(50, 50, s) for s in range(3)]
    together = tiny_encoder.dense_patches(images)
    monkeypatch.setattr(tiny_encoder, "max_batch", 1)
    alone = tiny_encoder.dense_patches(images)
    assert torch.allclose(together.patch_emb, alone.patch_emb, atol=1e-5)


def test_dense_on_resnet_raises_config_error(tmp_path):
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = load_encoder(str(path), "none", device="cpu")
    with pytest.raises(ConfigError, match="--patches grid"):
        enc.dense_patches([_noise(64, 64)])
    assert enc.grid_patches([_noise(64, 64)], grid=2).patch_emb.shape == (1, 4, 32)  # grid still works


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cuda(tiny_clip_config, tiny_clip_checkpoint, tiny_encoder, precision):
    enc = load_encoder(str(tiny_clip_config), str(tiny_clip_checkpoint), device="cuda", precision=precision)
    assert enc.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    images = [_noise(101, 37), _noise(64, 64, 5)]
    dense = enc.dense_patches(images)
    assert dense.global_emb.dtype == torch.float32
    assert torch.allclose(dense.global_emb, enc.encode_images(enc.preprocess(images)), atol=1e-2)
    cpu = tiny_encoder.dense_patches(images)
    assert torch.allclose(dense.patch_emb.cpu(), cpu.patch_emb, atol=5e-2)
    assert torch.allclose(enc.encode_text(["a cat"]).cpu(), tiny_encoder.encode_text(["a cat"]), atol=5e-2)
