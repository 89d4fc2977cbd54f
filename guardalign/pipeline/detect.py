"""The detection stage: decoded images → scan records (used by scan, mask and calibrate)."""
from __future__ import annotations

import time
from typing import Any

from guardalign.records import Decoded


class DetectStage:
    """Scores a batch of decoded images with one loaded :class:`~guardalign.detection.detector.Detector`.

    Items that could not be decoded become ``status: error`` records; ok records carry the Detection fields
    (``guardalign.records.SCAN_RECORD``), the image's ``sha256``, notes and the amortised model time.
    """

    name = "scan"
    unit = "img"

    def __init__(self, detector: Any, *, name: str = "scan", batch_size: int | None = None):
        self.detector = detector
        self.batch_size = batch_size or detector.config.batch_size
        self.name = name

    def settings(self) -> dict[str, Any]:
        return self.detector.settings()

    def process(self, batch: list[Decoded]) -> list[dict[str, Any]]:
        good = [d for d in batch if usable(d)]
        t0 = time.perf_counter()
        dets = iter(self.detector.detect([d.image for d in good]))
        per_image = (time.perf_counter() - t0) / max(1, len(good))  # amortised model time, for reports
        records = []
        for d in batch:
            if not usable(d):
                records.append(error_record(d))
                continue
            rec = {"id": d.item.id, "source": d.item.source, "status": "ok", "error": None, **next(dets).to_record()}
            rec["sha256"] = d.info.sha256  # of the stored bytes: mask --from-scan refuses an image that changed
            rec["image_column"] = d.item.meta.get("column")  # Parquet: which column (report reads the same)
            rec["notes"] = notes(d.info)
            rec["elapsed_s"] = round(per_image, 6)
            records.append(rec)
        return records


def usable(d: Decoded) -> bool:
    """The item decoded to an image and nothing is known to be wrong with it."""
    return d.image is not None and d.error is None and d.item.error is None


def error_record(d: Decoded) -> dict[str, Any]:
    return {"id": d.item.id, "source": d.item.source, "status": "error",
            "error": d.item.error or d.error or "no image", "verdict": None}


def notes(info: Any) -> list[str]:
    """Remarks a reviewer should see: animated images (first frame used), EXIF rotation applied."""
    out = []
    if info is not None and getattr(info, "frames", 1) > 1:
        out.append(f"animated image: first of {info.frames} frames used")
    if info is not None and getattr(info, "exif_rotated", False):
        out.append("EXIF orientation applied")
    return out
