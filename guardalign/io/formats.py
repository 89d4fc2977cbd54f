"""Which files are images, told by their bytes; and the raster formats guardalign lets Pillow decode.

- :data:`ALLOWED_FORMATS`: the only Pillow plugins ever asked to open a file (``Image.open(fp, formats=...)``).
  Vector and document formats (EPS, PS, PDF: Pillow hands EPS to Ghostscript), containers with their own
  decoders (ICNS, JPEG 2000, PSD, ...) and exotic plugins are never tried, whatever the file is named.
- :func:`sniff`: the format a file's first bytes declare (:data:`MAGIC_BYTES` bytes are enough), whether
  Pillow may decode it or not (HEIC, JPEG XL, EPS, PDF, ...), so a folder walk can recognise an image
  named ``.heic``, ``.JPG.txt`` or with no extension, and name what a non-image file is.
"""
from __future__ import annotations

from dataclasses import dataclass

# Pillow format names decoded by guardalign (the raster formats of IMAGE_EXTENSIONS). MPO is how Pillow
# opens multi-picture JPEGs from cameras; DIB is a headerless BMP.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO", "TGA",
                                    "AVIF")
MAGIC_BYTES = 32  # bytes read to sniff a file

# Raster formats Pillow cannot (or may not) decode here: recognised as images, reported as unsupported.
UNSUPPORTED_RASTER: tuple[str, ...] = ("HEIC", "JPEG XL", "JPEG 2000", "ICNS", "PSD", "QOI", "DDS", "CUR")
# Vector / document formats: never images to guardalign (and never handed to Ghostscript).
NOT_RASTER: tuple[str, ...] = ("EPS", "PDF", "SVG")

_HEIC_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")
_AVIF_BRANDS = (b"avif", b"avis")


@dataclass(frozen=True)
class Sniffed:
    format: str  # declared format, e.g. "PNG", "HEIC", "EPS"
    allowed: bool  # in ALLOWED_FORMATS: Pillow may decode it
    raster: bool  # a raster image (allowed or not); False for EPS / PDF / SVG


def _declared(head: bytes) -> str | None:
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n#":
        return "PPM"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if head[:4] == b"\x00\x00\x02\x00":
        return "CUR"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand in _HEIC_BRANDS:
            return "HEIC"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JPEG XL"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000"
    if head[:4] == b"icns":
        return "ICNS"
    if head[:4] == b"8BPS":
        return "PSD"
    if head[:4] == b"qoif":
        return "QOI"
    if head[:4] == b"DDS ":
        return "DDS"
    if head[:4] == b"%!PS" or head[:4] == b"\xc5\xd0\xd3\xc6":
        return "EPS"
    if head[:5] == b"%PDF-":
        return "PDF"
    text = head.lstrip()[:5].lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in head.lower()):
        return "SVG"
    return None


def sniff(head: bytes, name: str | None = None) -> Sniffed | None:
    """The format the first bytes of a file declare, or None when they declare no known image format.

    TGA has no magic number: it is recognised by the name the bytes were stored under (``name``: a file's path,
    a tar member's name) ending in ``.tga``, when the bytes declare nothing else or declare CUR, whose signature
    ``00 00 02 00`` is also how an uncompressed true-colour TGA (no ID, no colour map) starts.
    """
    fmt = _declared(head)
    if fmt in (None, "CUR") and name is not None and name.lower().endswith(".tga"):
        fmt = "TGA"
    if fmt is None:
        return None
    return Sniffed(fmt, fmt in ALLOWED_FORMATS, fmt not in NOT_RASTER)


def not_allowed_message(fmt: str) -> str:
    """Per-item error for a file whose bytes are a format guardalign does not decode."""
    if fmt in NOT_RASTER:
        return f"{fmt} is not a raster image format; guardalign decodes only {', '.join(_SHOWN)}"
    return f"{fmt} images are not supported; convert to one of {', '.join(_SHOWN)}"


_SHOWN = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WebP", "PPM", "ICO", "TGA", "AVIF")
