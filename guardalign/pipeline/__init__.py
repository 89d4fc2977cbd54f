"""The runner: resume + provenance, prefetch, batching, per-item errors, progress, gates."""
