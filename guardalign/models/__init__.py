"""Model loading and forward passes: CLIP (open_clip) and LVLMs (transformers)."""
