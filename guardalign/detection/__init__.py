"""Anchors, optimal transport, the detector, purification and threshold fitting."""
