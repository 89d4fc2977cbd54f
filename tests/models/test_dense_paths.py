"""Dense token paths (MaskCLIP, ClearCLIP, SCLIP) against an independent per-head computation.

The reference below rebuilds every path from the raw weights with an explicit loop over heads; the
library computes it with batched tensor ops (guardalign.models.patches.dense_tokens).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from guardalign.errors import ConfigError
from guardalign.models.clip import load_encoder
from guardalign.models.patches import DENSE_PATHS, dense_tokens


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _last_block_input(visual, pixels):
    """(B, L, W) input of the last block (CLS first), from open_clip's own intermediates API."""
    inter = visual.forward_intermediates(pixels, indices=[len(visual.transformer.resblocks) - 2],
                                         output_fmt="NLC", output_extra_tokens=True)
    return torch.cat([inter["image_intermediates_prefix"][0], inter["image_intermediates"][0]], dim=1)


def _reference(block, x, path):
    """Per-image, per-head loop with weights sliced by hand; the formulas of each paper."""
    attn = block.attn
    width, heads = x.shape[-1], attn.num_heads
    hd = width // heads
    wq, wk, wv = attn.in_proj_weight.split(width)
    bq, bk, bv = attn.in_proj_bias.split(width)
    ls_1 = getattr(block, "ls_1", lambda t: t)
    ln_attn = getattr(block, "ln_attn", lambda t: t)
    head_scale = getattr(attn, "head_scale", None)
    ln_inner = getattr(attn, "ln_inner", lambda t: t)
    out = []
    for xb in x:  # (L, W)
        y = block.ln_1(xb)
        q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
        per_head = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            qh, kh, vh = q[:, sl], k[:, sl], v[:, sl]
            if path == "maskclip":
                a = torch.eye(len(y))
            elif path == "clearclip":
                a = torch.softmax(qh @ qh.T / hd ** 0.5, dim=1)
            else:
                a = torch.softmax(qh @ qh.T / hd ** 0.5, dim=1) + torch.softmax(kh @ kh.T / hd ** 0.5, dim=1)
            oh = a @ vh
            per_head.append(oh * head_scale[h] if head_scale is not None else oh)
        o = ls_1(ln_attn(attn.out_proj(ln_inner(torch.cat(per_head, dim=1)))))
        if path == "sclip":  # keep the residual and the FFN
            o = xb + o
            o = o + getattr(block, "ls_2", lambda t: t)(block.mlp(block.ln_2(o)))
        out.append(o)
    return torch.stack(out)


@pytest.mark.parametrize("path", DENSE_PATHS)
def test_dense_path_matches_independent_computation(tiny_encoder, path):
    images = [_noise(64, 64, 9), _noise(90, 40, 3)]
    visual = tiny_encoder.model.visual
    with torch.no_grad():
        x = _last_block_input(visual, tiny_encoder.preprocess(images))
        last = visual.transformer.resblocks[-1]
        ref = _reference(last, x, path)
        assert torch.allclose(dense_tokens(last, x, path), ref, atol=1e-5)
        expected = F.normalize(visual.ln_post(ref[:, 1:]) @ visual.proj, dim=-1)
    batch = tiny_encoder.dense_patches(images, path=path)
    assert batch.patch_emb.shape == (2, 16, 32)
    assert torch.allclose(batch.patch_emb, expected, atol=1e-5)
    # the global view is the tower's own output whatever the path
    assert torch.allclose(batch.global_emb, tiny_encoder.encode_images(tiny_encoder.preprocess(images)), atol=1e-6)


def test_dense_paths_differ_from_each_other(tiny_encoder):
    images = [_noise(64, 64, 4)]
    emb = {p: tiny_encoder.dense_patches(images, path=p).patch_emb for p in DENSE_PATHS}
    for a in DENSE_PATHS:
        for b in DENSE_PATHS:
            if a < b:
                assert not torch.allclose(emb[a], emb[b], atol=1e-3), (a, b)


@pytest.mark.parametrize("path", ["clearclip", "sclip"])
def test_attention_paths_on_custom_blocks(tiny_clip_config, tmp_path, path):
    """open_clip's custom block: head scale, inner norm, post-attention norm, layer scale."""
    cfg = json.loads(tiny_clip_config.read_text())
    cfg["vision_cfg"].update(scale_heads=True, scale_attn_inner=True, scale_attn=True, ls_init_value=0.5)
    file = tmp_path / "custom.json"
    file.write_text(json.dumps(cfg))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(5)
        warnings.simplefilter("ignore")
        enc = load_encoder(str(file), "none", device="cpu")
    last = enc.model.visual.transformer.resblocks[-1]
    assert type(last).__name__ == "CustomResidualAttentionBlock"
    with torch.no_grad():  # move the identity-initialised extras away from identity
        for name, param in last.named_parameters():
            if any(k in name for k in ("head_scale", "ln_inner", "ln_attn", "ls_1", "ls_2")):
                param.add_(torch.randn_like(param) * 0.3)
        x = torch.randn(2, 17, 64)
        assert torch.allclose(dense_tokens(last, x, path), _reference(last, x, path), atol=1e-5)


def test_unknown_dense_path_is_a_config_error(tiny_encoder):
    with pytest.raises(ConfigError, match="dense path"):
        tiny_encoder.dense_patches([_noise(32, 32)], path="nope")
