"""One library entry point per command: scan, mask, answer, calibrate, report."""
