"""webdataset tar shards → :class:`~guardalign.records.Item` (one per sample), checked before anything is yielded.

A shard is a plain ``.tar`` whose members are grouped into samples by key, webdataset's convention: the key is the
member path up to the first dot of its file name, the rest is the field (``0001.jpg`` → key ``0001``, field
``jpg``; ``dir/0001.seg.png`` → key ``dir/0001``, field ``seg.png``). A sample needs exactly one image field
(``jpg``, ``png``, ``webp``, … : :data:`~guardalign.io.images.IMAGE_EXTENSIONS`); ``json`` and ``txt`` sidecars go
into ``Item.meta`` (``json``: the parsed value, ``txt``: the text); other fields are left alone. The id is
``<shard>#<key>``.

The whole member index is read and checked first (headers only: the data is skipped by seeking), so a damaged shard
can never be half-trusted. Each problem becomes an error item for the sample it concerns, never a silently wrong
sample:

- a key whose members are not adjacent (the known pitfall of readers that group consecutive members, such as
  Ray's ``read_webdataset``), or a field that appears twice, or two image fields;
- a member that is not a regular file (symlink, hard link, device, FIFO; directories are skipped);
- a member name that is absolute, has a ``..`` part, a backslash or control characters;
- a sample with no image field, a sidecar that is not UTF-8 (or not JSON), a member over the size limit;
- a shard that ends early or has a damaged header: the sample before the damage is an error too (it may have lost
  members), and the shard itself gets an error item ``<shard>`` naming the offset.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from guardalign.io.images import IMAGE_EXTENSIONS, MAX_FILE_BYTES
from guardalign.records import Item

TAR_EXTENSIONS = frozenset({".tar"})
IMAGE_FIELDS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
SIDECARS = ("json", "txt")  # fields loaded into Item.meta
_BLOCK = 512


def is_tar(path: str | Path) -> bool:
    """A webdataset shard: a file named ``*.tar`` (any case)."""
    return Path(str(path)).suffix.lower() in TAR_EXTENSIONS


@dataclass
class Member:
    name: str  # member path in the tar
    field: str  # webdataset field: the name after the key's first dot ("jpg", "json", "seg.png")
    offset: int  # byte offset of the member's data in the tar
    size: int  # bytes of data
    mode: int = 0o644  # permission bits, kept by a purified copy
    mtime: float = 0.0  # modification time, kept by a purified copy


@dataclass
class Sample:
    key: str  # the member path up to the first dot of the file name
    members: list[Member] = field(default_factory=list)  # in tar order
    error: str | None = None  # why the sample cannot be trusted

    def fail(self, why: str) -> None:
        self.error = self.error or why

    @property
    def image(self) -> Member | None:
        images = [m for m in self.members if m.field.lower() in IMAGE_FIELDS]
        return images[0] if len(images) == 1 else None


def split_name(name: str) -> tuple[str, str]:
    """``"dir/0001.seg.png"`` → ``("dir/0001", "seg.png")``; a name without a dot has the field ``""``."""
    head, slash, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    return head + slash + stem, rest if dot else ""


def unsafe_name(name: str) -> str | None:
    """Why a member name could escape a folder or confuse a path, or None when it is a plain relative path."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if "\\" in name:
        return "a backslash"
    if re.search(r"[\x00-\x1f\x7f]", name):
        return "control characters"
    if any(part == ".." for part in name.split("/")):
        return "a '..' part"
    return None


_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


def index_tar(f: BinaryIO) -> tuple[list[Sample], str | None]:
    """Every sample of the shard open as ``f`` (seekable), in tar order, and the shard-level error (or None).

    Reads headers only. Checks each sample's grouping, fields and member kinds (module docstring) and that the
    shard ends with an end-of-archive block after the last member, which ``tarfile`` alone does not check.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    samples: list[Sample] = []
    by_key: dict[str, Sample] = {}
    error = None
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as exc:
        return [], f"not a readable tar ({exc})"
    try:
        while True:
            info = tf.next()
            if info is None:
                break
            error = _add_member(info, size, samples, by_key)
            if error:
                break
    except (tarfile.TarError, OSError, UnicodeError) as exc:
        error = f"damaged after byte {tf.offset} ({exc})"
    end = tf.offset
    if error is None and not _end_marker(f, end, size):
        error = f"no end-of-archive block after byte {end}: the tar is truncated or damaged there"
    if error and samples:
        samples[-1].fail(f"the tar is damaged right after this sample ({error}); it may have lost members")
    return samples, error


def _add_member(info: tarfile.TarInfo, size: int, samples: list[Sample], by_key: dict[str, Sample]) -> str | None:
    """Put one member into its sample; a shard-level error (data past the end of the file) or None."""
    if info.isdir():
        return None
    key, fld = split_name(info.name)
    sample = by_key.get(key)
    if sample is None:
        sample = by_key[key] = Sample(key)
        samples.append(sample)
    elif samples[-1] is not sample:
        sample.fail(f"member {info.name!r} comes after other samples: the tar is not grouped by key "
                    "(each sample's members must be adjacent)")
    if info.offset_data + info.size > size:
        return f"member {info.name!r} needs bytes up to {info.offset_data + info.size} but the file has {size}"
    why = unsafe_name(info.name)
    if why:
        sample.fail(f"member name {info.name!r} has {why}")
    elif not info.isreg():
        sample.fail(f"member {info.name!r} is {_KINDS.get(info.type, 'not a regular file')}, not a regular file")
    elif info.size > MAX_FILE_BYTES:
        sample.fail(f"member {info.name!r} is over {MAX_FILE_BYTES >> 20} MiB")
    if any(m.field == fld for m in sample.members):
        sample.fail(f"member {info.name!r} appears twice (duplicate key and field)")
    sample.members.append(Member(info.name, fld, info.offset_data, info.size, info.mode, info.mtime))
    return None


def _end_marker(f: BinaryIO, end: int, size: int) -> bool:
    """The block at ``end`` exists and is all zeros (a tar's end-of-archive marker)."""
    if size < end + _BLOCK:
        return False
    f.seek(end)
    return f.read(_BLOCK).strip(b"\0") == b""


def _read(f: BinaryIO, m: Member) -> bytes:
    f.seek(m.offset)
    data = f.read(m.size)
    if len(data) != m.size:
        raise OSError(f"member {m.name!r}: read {len(data)} of {m.size} bytes")
    return bytes(data)


def _sample_item(f: BinaryIO, s: Sample, base: str, source: str) -> Item:
    """The item of one checked sample: image bytes, sidecars in meta, or the reason it is unusable."""
    meta: dict = {"tar": source, "key": s.key}
    item_id = f"{base}#{s.key}"
    img = s.image
    if s.error is None and img is None:
        n = sum(m.field.lower() in IMAGE_FIELDS for m in s.members)
        fields = ", ".join(m.field or "(none)" for m in s.members)
        s.fail(f"{'two image fields' if n > 1 else 'no image field'} (fields: {fields}); a sample needs exactly one")
    where = f"{source}#{img.name if img is not None else s.key}"
    if s.error is not None:
        return Item(item_id, where, error=s.error, meta=meta)
    try:
        for m in s.members:
            if m.field in SIDECARS:
                text = _read(f, m).decode("utf-8")
                meta[m.field] = json.loads(text) if m.field == "json" else text
        meta["member"] = img.name
        return Item(item_id, where, data=_read(f, img), meta=meta)
    except UnicodeDecodeError:
        why = f"sidecar {m.name!r} is not UTF-8 text"
    except ValueError as exc:
        why = f"sidecar {m.name!r} is not valid JSON ({exc})"
    except OSError as exc:
        why = f"cannot read the shard ({exc})"
    return Item(item_id, where, error=why, meta=meta)


def tar_items(path: str | Path, base: str, *, opener: Callable[[], BinaryIO] | None = None) -> Iterator[Item]:
    """One item per sample of the shard at ``path`` (ids ``<base>#<key>``), in tar order, then one error item
    ``<base>`` if the shard is damaged. ``opener`` opens it (default: the local file), e.g. a pyarrow filesystem's
    ``open_input_file`` for ``s3://`` shards."""
    source = str(path)
    try:
        f = opener() if opener is not None else open(path, "rb")
    except OSError as exc:
        yield Item(base, source, error=f"cannot open tar shard ({exc.strerror or exc})", meta={"tar": source})
        return
    with f:
        try:
            samples, error = index_tar(f)
        except OSError as exc:
            samples, error = [], f"cannot read tar shard ({exc.strerror or exc})"
        for s in samples:
            yield _sample_item(f, s, base, source)
    if error:
        yield Item(base, source, error=f"tar shard {source}: {error}", meta={"tar": source})


def count_samples(path: str | Path) -> int:
    """Samples in a shard (plus one for a shard-level error), for progress totals; 1 when unreadable."""
    try:
        with open(path, "rb") as f:
            samples, error = index_tar(f)
    except OSError:
        return 1
    return len(samples) + (1 if error else 0)
