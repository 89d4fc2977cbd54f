"""Image decoding for scans: an allowed raster image → a fully loaded, upright RGB first frame.

Only the raster formats of :data:`guardalign.io.formats.ALLOWED_FORMATS` are ever opened (never EPS, PS, PDF,
ICNS, ...: Pillow would hand EPS to Ghostscript), told by the bytes, not the name (TGA, which has no magic bytes,
is told by the name: a file's path, a tar member's name, :func:`item_name`); and the bomb guard checks
the size of everything decoding may touch (every ICO entry, every TIFF frame) before any pixel is decoded.

Every failure is an :class:`ImageDecodeError` whose message names the cause ("zero-byte file",
"truncated image data", "decompression bomb: N pixels > limit L", ...), so a batch run can record
it for the item and carry on. Pillow's decompression-bomb guard stays ON: its warning (above
``Image.MAX_IMAGE_PIXELS``) is treated as an error exactly like its hard error (above twice that).

Colour handling: CMYK, palette (with or without transparency), LA/RGBA, 1-bit and 16-bit greyscale
all decode to 8-bit RGB. Alpha is dropped the way ``convert("RGB")`` drops it (the colour under a
transparent pixel is kept), which is what CLIP-style preprocessors feed the model, so hidden content
is scanned too. 16-bit greyscale is scaled to 8 bits (Pillow's own conversion clips it to white).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from guardalign.records import Decoded, Item

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from guardalign.io.formats import ALLOWED_FORMATS, MAGIC_BYTES, not_allowed_message, sniff

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
        ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".avif",
    }
)

_ORIENTATION_TAG = 0x0112
# An image file above this size is refused before it is read: uncompressed 16-bit RGBA at Pillow's pixel
# limit is about 0.7 GiB, and reading is whole-file (so the bytes scanned are exactly the bytes hashed).
MAX_FILE_BYTES = 1 << 30
# Serialises the (header-only) Image.open calls of the decode threads while the bomb warning is
# turned into an exception: warnings.catch_warnings is process-global state in Python < 3.14.
_OPEN_LOCK = threading.Lock()


class ImageDecodeError(Exception):
    """An image could not be decoded; ``str(err)`` names the cause."""


@dataclass(frozen=True)
class DecodeInfo:
    width: int  # width in pixels of the returned image (after EXIF rotation)
    height: int  # height in pixels of the returned image (after EXIF rotation)
    mode: str  # Pillow mode of the stored image before RGB conversion, e.g. "CMYK", "P", "I;16"
    format: str | None  # Pillow format name ("JPEG", "PNG", "GIF", ...), None if Pillow gives none
    frames: int  # frames in the file; > 1 means animated (the first frame is returned)
    exif_rotated: bool  # True when an EXIF orientation other than "normal" was applied
    sha256: str = ""  # hex SHA-256 of the encoded bytes as stored (file contents or Parquet cell)


def decode_image(
    data: bytes | None = None,
    path: str | Path | None = None,
    max_pixels: int | None = None,
    name: str | None = None,
) -> tuple[Image.Image, DecodeInfo]:
    """Decode one image from bytes or a file.

    Parameters
    ----------
    data : bytes, optional
        Encoded image bytes. Give exactly one of ``data`` and ``path``.
    path : str or Path, optional
        Image file to read.
    max_pixels : int, optional
        Refuse images with more pixels than this (default ``Image.MAX_IMAGE_PIXELS``). It can only
        lower Pillow's own guard, which stays in force.
    name : str, optional
        The name the bytes were stored under (default: ``path``); it tells only TGA (no magic bytes).

    Returns
    -------
    image : PIL.Image.Image
        Mode "RGB", size (W, H) after EXIF orientation, pixels loaded (truncation already caught).
    info : DecodeInfo

    Raises
    ------
    ImageDecodeError
        Naming the cause: missing/unreadable file, zero bytes, not an image, truncated or corrupt
        data, decompression bomb, unsupported mode.
    """
    if (data is None) == (path is None):
        raise ValueError("decode_image needs exactly one of data= or path=")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is None:  # someone disabled Pillow's guard globally; keep ours
        limit = 89_478_485
    if path is not None:
        data, name = read_image_bytes(path), str(path) if name is None else name
    elif len(data) == 0:
        raise ImageDecodeError("zero-byte image data")
    with io.BytesIO(data) as fp:
        im = _open_image(fp, limit, name)
        with im:
            rgb, info = _decode_opened(im)
    return rgb, replace(info, sha256=hashlib.sha256(data).hexdigest())


def read_image_bytes(path: str | Path) -> bytes:
    """The whole contents of an image file, or ImageDecodeError naming why it cannot be read."""
    path = Path(path)
    with _open_file(path) as fp:
        try:
            data = fp.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise ImageDecodeError(f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageDecodeError("zero-byte file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageDecodeError(f"file too large for an image (over {MAX_FILE_BYTES >> 20} MiB)")
    return data


def _open_file(path: Path):
    """Open ``path`` for binary reading, or raise ImageDecodeError naming why it cannot be read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageDecodeError(f"broken symlink (points to {os.readlink(path)!r})") from None
        raise ImageDecodeError("file not found") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot access file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError("is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise ImageDecodeError("not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError("zero-byte file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageDecodeError(f"file too large for an image ({st.st_size} bytes > {MAX_FILE_BYTES >> 20} MiB)")
    try:
        return _read_open(path)
    except PermissionError:
        raise ImageDecodeError("permission denied (file is not readable)") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read file ({e.strerror or e})") from None


def _read_open(path: Path):
    """Open a file for reading (separate so tests can simulate an unreadable file as root)."""
    return open(path, "rb")


def _bomb_message(pixels: int, limit: int) -> str:
    return f"decompression bomb: {pixels} pixels > limit {limit} (Pillow's guard)"


def _open_image(fp, limit: int, name: str | None = None) -> Image.Image:
    """Read the header with the raster allow-list only; every frame's size is checked before any decoding.

    DecompressionBombWarning and DecompressionBombError both raise. A file whose bytes declare a format that
    is not allowed (EPS, PDF, HEIC, ICNS, ...) is refused by name, whatever its extension. A TGA (told by ``name``,
    see :func:`~guardalign.io.formats.sniff`) is opened by the TGA plugin only.
    """
    head = fp.read(MAGIC_BYTES)
    fp.seek(0)
    sniffed = sniff(head, name)
    if sniffed is not None and not sniffed.allowed:
        raise ImageDecodeError(not_allowed_message(sniffed.format))
    formats = ("TGA",) if sniffed is not None and sniffed.format == "TGA" else _open_formats()
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (cannot identify image file)") from None
    except Exception as e:  # a plugin choking on a malformed header
        raise ImageDecodeError(f"corrupt image header ({type(e).__name__}: {e})") from None
    try:
        if im.format not in ALLOWED_FORMATS:  # a plugin that reports another format than its own name
            raise ImageDecodeError(not_allowed_message(str(im.format)))
        for w, h in _frame_sizes(im):
            pixels = max(1, w) * max(1, h)
            if pixels > limit:
                raise ImageDecodeError(_bomb_message(pixels, limit))
    except BaseException:
        im.close()
        raise
    return im


def _open_formats() -> tuple[str, ...]:
    """The allowed formats Pillow has an opener for (MPO is opened by the JPEG plugin; AVIF needs libavif)."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _frame_sizes(im: Image.Image) -> list[tuple[int, int]]:
    """(width, height) of everything decoding may touch, read from headers only (nothing is decoded).

    ICO entries are sized from their own PNG / DIB headers (the directory's sizes stop at 256 and a PNG entry
    may be far larger); TIFF and MPO frames by seeking their headers.
    """
    sizes = [im.size]
    try:
        if im.format == "ICO":
            sizes += [_ico_entry_size(im.ico.buf, e.offset) for e in im.ico.entry]
        elif im.format in ("TIFF", "MPO"):
            n = int(getattr(im, "n_frames", 1))
            for i in range(1, n):
                im.seek(i)
                sizes.append(im.size)
            if n > 1:
                im.seek(0)
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"corrupt image header ({type(e).__name__}: {e})") from None
    return sizes


def _ico_entry_size(buf, offset: int) -> tuple[int, int]:
    import struct

    buf.seek(offset)
    head = buf.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if len(head) >= 12:  # BITMAPINFOHEADER: width, height (XOR + AND masks: height is doubled)
        w, h = struct.unpack("<ii", head[4:12])
        return abs(w), abs(h) // 2
    raise ImageDecodeError("corrupt ICO entry (truncated header)")


def _decode_opened(im: Image.Image) -> tuple[Image.Image, DecodeInfo]:
    """Count frames, load frame 0, apply EXIF orientation, convert to RGB."""
    mode, fmt = im.mode, im.format
    frames = _count_frames(im)
    try:
        im.load()
    except EOFError:
        raise ImageDecodeError("truncated image data (unexpected end of file)") from None
    except OSError as e:
        if "truncat" in str(e).lower():
            raise ImageDecodeError(f"truncated image data ({e})") from None
        raise ImageDecodeError(f"corrupt image data ({e})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except Exception as e:  # SyntaxError ("broken PNG file"), ValueError, struct.error, ...
        raise ImageDecodeError(f"corrupt image data ({type(e).__name__}: {e})") from None
    upright, rotated = _exif_upright(im)
    rgb = _to_rgb(upright)
    info = DecodeInfo(rgb.width, rgb.height, mode, fmt, frames, rotated)
    return rgb, info


def _count_frames(im: Image.Image) -> int:
    """Frames in an animated file (1 for still images); leaves ``im`` on frame 0."""
    try:
        n = int(getattr(im, "n_frames", 1))
    except Exception:  # a broken later frame: the first one may still be fine
        n = 1
    if n > 1:
        try:
            im.seek(0)
        except Exception as e:
            raise ImageDecodeError(f"corrupt animated image ({type(e).__name__}: {e})") from None
    return max(n, 1)


def _exif_upright(im: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation tag; a malformed EXIF block is ignored, not fatal."""
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return im, False
    if orientation in (None, 1):
        return im, False
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:
        return im, False
    return (out if out is not None else im), orientation in range(2, 9)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → a new 8-bit RGB image (never the file-backed original)."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), mode), mode="L").convert("RGB")
    try:
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # avoids Pillow's palette-transparency warning
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"unsupported image mode {mode!r} ({e})") from None


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit / 32-bit integer / float greyscale to uint8, shape (H, W) preserved."""
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        a = a / 257.0
    elif mode == "I":
        a = np.clip(a, 0, 65535)
        if a.size and a.max() > 255:
            a = a / 257.0
    else:  # "F": treat [0, 1] data as normalised, anything else as 8-bit levels
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- streams


def item_name(item: Item) -> str | None:
    """The name an item's bytes were stored under, whatever the source: the file's path, the tar member's name
    (``meta["member"]``), a file URI (``meta["name"]``); None for bytes with no name (a Parquet cell)."""
    return str(item.path) if item.path is not None else item.meta.get("member") or item.meta.get("name")


def _decode_item(item: Item, max_pixels: int | None) -> Decoded:
    """Decode one item; a file's bytes are read once and kept on the returned item (``item.data``), so
    whatever a consumer later copies or purifies is exactly what was scanned and hashed."""
    if item.data is None and item.path is None:
        return Decoded(item, None, None, "no image data")
    try:
        if item.data is None:
            item = replace(item, data=read_image_bytes(item.path))
        image, info = decode_image(data=item.data, max_pixels=max_pixels, name=item_name(item))
    except ImageDecodeError as e:
        return Decoded(item, None, None, str(e))
    except Exception as e:  # a decoder plugin bug must cost one item, not the run
        return Decoded(item, None, None, f"cannot decode image ({type(e).__name__}: {e})")
    return Decoded(item, image, info, None)


def decode_stream(
    items: Iterable[Item],
    workers: int = 4,
    prefetch: int = 64,
    *,
    max_pixels: int | None = None,
    decode=None,
) -> Iterator[Decoded]:
    """Decode items in worker threads, yielding results in input order.

    At most ``prefetch`` items are pulled from ``items`` ahead of the consumer (being decoded or
    decoded and waiting), so memory stays flat however long the stream. Items that already carry
    an ``error`` are passed through without decoding. Closing the generator early cancels pending work.
    ``decode(item) -> Decoded`` replaces the default full decode (e.g. a stage that needs only the bytes).
    """
    if workers < 1 or prefetch < 1:
        from guardalign.errors import ConfigError

        raise ConfigError(f"invalid --workers {workers} (prefetch {prefetch}): expected a positive number of threads")
    it = iter(items)
    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="guardalign-decode")
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < prefetch:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                fut = None if item.error else (pool.submit(decode, item) if decode is not None
                                               else pool.submit(_decode_item, item, max_pixels))
                pending.append((item, fut))
            if not pending:
                return
            item, fut = pending.popleft()
            yield fut.result() if fut is not None else Decoded(item, None, None, item.error)
    finally:
        for _, fut in pending:
            if fut is not None:
                fut.cancel()
        pending.clear()
        pool.shutdown(wait=True, cancel_futures=True)
