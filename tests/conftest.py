"""Shared test fixtures: offline environment and a tiny random CLIP loaded through the real path.

Fixtures (session-scoped):
- ``tiny_clip_config``: Path of ``tests/fixtures/tiny-clip.json`` (ViT, 64 px input, 16 px patches → 4×4
  tokens, width 64, 2 layers, 2 heads, embed_dim 32; text context 77, vocab 49408).
- ``tiny_clip_checkpoint``: Path of a safetensors checkpoint of that model with seed-0 random weights.
- ``tiny_encoder``: ``load_encoder(config, checkpoint, device="cpu")``: the way users load local weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test session may touch the network; set before huggingface_hub reads its constants.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# The test machine's cores are shared: one intra-op thread (read by torch at import; no torch import here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so an unseeded draw cannot make a run flaky."""
    import random

    import torch

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_clip_config() -> Path:
    """Path of the tiny open_clip model-config JSON."""
    return FIXTURES / "tiny-clip.json"


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tiny_clip_config, tmp_path_factory) -> Path:
    """Safetensors checkpoint of the tiny model with seed-0 random weights."""
    import contextlib
    import io

    import torch

    from guardalign.models.clip import load_encoder, save_checkpoint

    with torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(io.StringIO()):
        torch.manual_seed(0)  # the "random weights" warning line is intended here: keep it off the log
        encoder = load_encoder(str(tiny_clip_config), "none", device="cpu")
    return save_checkpoint(encoder.model, tmp_path_factory.mktemp("tiny-clip") / "tiny-clip.safetensors")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_clip_config, tiny_clip_checkpoint):
    """ClipEncoder of the tiny model, loaded from config JSON + checkpoint on CPU."""
    from guardalign.models.clip import load_encoder

    return load_encoder(str(tiny_clip_config), str(tiny_clip_checkpoint), device="cpu")
