"""Sources, image decoding and record files: everything that touches the filesystem."""
