"""Hostile image files made in code: corrupt, empty, disguised, odd modes, huge and lying headers, plus a good one."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms
from skimage import data as skdata

HUGE_SIDE = 12000  # a 12000x12000 PNG: 144 MP, a few hundred KB on disk
LIE_SIDE = 30000  # a header claiming 30000x30000 (900 MP, past PIL's own bomb limit) over a few bytes of data


def photo(size: int = 96) -> Image.Image:
    """A real photo (skimage's astronaut) as an RGB square."""
    return Image.fromarray(skdata.astronaut()).convert("RGB").resize((size, size))


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """``image`` saved to bytes in ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def lying_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR claims ``width`` x ``height`` over one row of real data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x80" * 3 * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def huge_png(side: int = HUGE_SIDE) -> bytes:
    """A real, valid ``side`` x ``side`` grayscale PNG (written row by row, never held whole in memory)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" + bytes(range(256)) * (side // 256) + b"\x00" * (side % 256)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def exif_rotated(image: Image.Image) -> bytes:
    """``image`` stored sideways as a JPEG with EXIF orientation 6 (shown rotated 90 degrees clockwise: upright)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def cmyk_icc(image: Image.Image) -> bytes:
    """``image`` as a CMYK JPEG carrying an (RGB, hence mismatching) ICC profile."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(image.convert("CMYK"), "JPEG", quality=95, icc_profile=profile)


def palette_alpha() -> bytes:
    """A palette PNG with a transparent index."""
    image = photo(96).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def sixteen_bit() -> bytes:
    """A 16-bit grayscale PNG."""
    arr = (np.asarray(photo(96).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def hostile_files(base: Image.Image | None = None) -> dict[str, bytes]:
    """File name -> bytes of every hostile kind, and ``good.png``.

    ``base`` (default: a 96 px photo) is the picture of ``good.png`` and of the readable odd encodings
    (CMYK with ICC, EXIF-rotated); the other readable kinds use the small photo.
    """
    base = base if base is not None else photo(96)
    good = encode(base, "PNG")
    return {
        "good.png": good,
        "truncated.png": good[: len(good) // 2],
        "truncated.jpg": encode(photo(96), "JPEG")[:600],
        "zero.png": b"",
        "pdf_renamed.png": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        "garbage.jpg": np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        "cmyk_icc.jpg": cmyk_icc(base),
        "sixteen_bit.png": sixteen_bit(),
        "palette_alpha.png": palette_alpha(),
        "transparent.png": encode(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "PNG"),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "exif_rotated.jpg": exif_rotated(base),
        "huge.png": huge_png(),
        "lying_header.png": lying_png(LIE_SIDE, LIE_SIDE),
        "lying_small.png": lying_png(64, 64),
    }


def write_files(folder: Path, base: Image.Image | None = None) -> dict[str, Path]:
    """Write `hostile_files` into ``folder``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in hostile_files(base).items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths
