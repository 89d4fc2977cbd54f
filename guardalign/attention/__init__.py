"""Attention calibration (GuardAlign Eqs. 12-14) and the TGA probe internals."""
