"""Toy world for measuring detection quality without real CLIP weights (issue 7).

- :mod:`bench.toyworld.world`: 17 procedurally drawn concepts (3 unsafe), captions, training tiles;
- :mod:`bench.toyworld.composites`: 3×3 mosaics with one planted tile covering 1/9, 1/4 or 1/2;
- :mod:`bench.toyworld.anchors_yaml`: the anchors YAML of the unsafe concepts;
- :mod:`bench.toyworld.train`: a tiny open_clip CLIP trained contrastively on CPU, cached under bench/out/.

Example::

    from bench.toyworld.train import cached_model, load_trained, settings_for
    model = cached_model(settings_for(quick=True))   # trains once (≈ 30 s), then loads from bench/out/
    encoder = load_trained(model)                    # load_encoder(model.json, model.safetensors)
"""
from bench.toyworld.anchors_yaml import anchors_text, write_anchors
from bench.toyworld.composites import COVERAGES, Composite, composite, eval_set
from bench.toyworld.world import CONCEPTS, NAMES, SAFE, UNSAFE, captions, render, single_concept_set

__all__ = ["CONCEPTS", "NAMES", "SAFE", "UNSAFE", "captions", "render", "single_concept_set", "COVERAGES",
           "Composite", "composite", "eval_set", "anchors_text", "write_anchors"]
