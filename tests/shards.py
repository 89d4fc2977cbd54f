"""Test helpers: webdataset tar shards built member by member (good ones and every kind of damage), and a small
HF-style image Parquet."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(i: int, fmt: str = "PNG", size=(24, 16)) -> bytes:
    """A distinct small image (noise seeded by ``i``) encoded as ``fmt``."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list) -> Path:
    """``members``: ``(name, bytes)`` regular files, or ``(name, tarfile.TarInfo-type, linkname)`` special ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if len(m) == 2:
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
            else:
                info.type, info.linkname = m[1], m[2]
                tf.addfile(info)
    return path


def good_shard(path: Path, n: int = 4, start: int = 0, sidecars: bool = True) -> Path:
    """``n`` samples ``{k:06d}.png`` (+ ``.json`` and ``.txt`` sidecars), keys from ``start``."""
    members = []
    for k in range(start, start + n):
        members.append((f"{k:06d}.png", image_bytes(k)))
        if sidecars:
            members.append((f"{k:06d}.json", json.dumps({"caption": f"sample {k}", "k": k}).encode()))
            members.append((f"{k:06d}.txt", f"caption {k}".encode()))
    return write_tar(path, members)


def image_parquet(path: Path, n: int, group: int = 3, start: int = 0) -> Path:
    """``n`` rows of struct<bytes, path> images (distinct noise) in row groups of ``group`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": image_bytes(start + i), "path": f"{i}.png"} for i in range(n)]
    table = pa.table({"image": pa.array(cells, struct), "n": list(range(n))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=group)
    return path
