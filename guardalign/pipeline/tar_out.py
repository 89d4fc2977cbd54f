"""``mask`` on a webdataset shard: a purified shard with the same members in the same order.

Each sample that ``mask`` handles is written as it comes (samples arrive in tar order): its image member replaced by
the purified bytes (renamed ``<key>.<ext>`` when the format had to change), a safe image and every other member
(sidecars, labels, …) copied byte for byte, with their names, modes and times. A sample that could not be verified
(unreadable, damaged, changed since the scan), or whose purification failed, is left out: a tar has no null cell, and
unpurified bytes are never passed on (its manifest entry says why). The shard is written to a temp file and renamed
when complete, like a Parquet output; ``abort`` removes the temp file.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Any

from guardalign.io.webdataset import index_tar
from guardalign.pipeline.mask_out import TMP_SUFFIX, inside


def open_source(src: str):
    """A seekable binary file for a local shard or a pyarrow-filesystem URI."""
    if "://" in src:
        from guardalign.pipeline.fragments import _fs

        filesystem, path = _fs(src)
        return filesystem.open_input_file(path)
    return open(src, "rb")


class TarOut:
    """Writes one purified shard (module docstring); the same interface as ParquetOut for :class:`MaskStage`."""

    what = "tar"

    def __init__(self, src: str, rel: str, job: Any):
        self.src, self.rel, self.job = src, rel, job
        self.target = job.root / rel
        if not inside(str(self.target.parent), job.root):
            raise ValueError(f"tar output {rel} would leave --out-dir")
        if os.path.realpath(self.target) in job.originals:
            raise ValueError(f"tar output {rel} is an input file; originals are never overwritten")
        self.f = open_source(src)
        samples, _ = index_tar(self.f)
        self.samples = {s.key: s for s in samples}
        self.index = {s.key: i for i, s in enumerate(samples)}  # key → sample number, the entry's "row"
        self.failed: str | None = None  # why the output was abandoned
        self.done: list[dict] = []  # manifest entries of samples recorded as written into this output
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.with_name(f".{self.target.name}.{os.getpid()}{TMP_SUFFIX}")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)

    def put(self, key: str, image: bytes, image_name: str | None = None) -> None:
        """Write sample ``key``: its image member holds ``image`` (named ``image_name`` when given)."""
        sample = self.samples[key]
        img = sample.image
        for m in sample.members:
            data = image if m is img else self._read(m)
            info = tarfile.TarInfo(image_name if (m is img and image_name) else m.name)
            info.size, info.mode, info.mtime = len(data), m.mode, m.mtime
            self.tar.addfile(info, io.BytesIO(data))

    def _read(self, m) -> bytes:
        self.f.seek(m.offset)
        data = self.f.read(m.size)
        if len(data) != m.size:
            raise OSError(f"{self.src}: member {m.name!r} is shorter than its header says")
        return bytes(data)

    def finish(self) -> None:
        self.tar.close()
        self.f.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.path.lexists(self.target) and not self.job.overwrite:
            raise FileExistsError(f"{self.rel} appeared during the run; not overwritten")
        os.replace(self.tmp, self.target)

    def abort(self) -> None:
        for close in (self.tar.close, self.f.close):
            try:
                close()
            except Exception:
                pass
        self.tmp.unlink(missing_ok=True)
