"""Fixtures of the fault suite (issue 11): a tiny random-weight detector built once per module."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def detector(tiny_encoder):
    """Detector over the tiny CLIP and the shipped anchors; τ = 2 flags every patch (a cost 1 − cos is ≤ 2)."""
    from guardalign.config import DetectConfig
    from guardalign.detection.anchors import load_anchors
    from guardalign.detection.detector import Detector

    return Detector(tiny_encoder, load_anchors(None), DetectConfig(tau=2.0, batch_size=8))
