"""Robust image reading under a pixel cap: any cell `datasets` gives (decoded or not) to 8-bit RGB, and pixel digests."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, NamedTuple

from PIL import Image, ImageFile, ImageOps

MIN_PIXELS = 32 * 32  # the smallest pixel cap a stage accepts: below it no image could be measured
DEFAULT_MAX_PIXELS = 40_000_000  # ~40 MP: 1 MP editors with ample headroom; 120 MB as 8-bit RGB
JPEG_SCALES = (1, 2, 4, 8)  # the reductions a JPEG decoder applies while decoding (`Image.draft`)
RUN_PNG_LEVEL = 1  # zlib level of the PNGs a stage stores in its run folder: 3-5x faster than the default (6) for ~13% more bytes
UNSAFE_FORMATS = ("EPS",)  # plugins that run an external program (Ghostscript) on the data
# what Pillow's plugins and decoders raise on corrupt data (the message says which)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, TypeError, IndexError, MemoryError)


class ImageError(ValueError):
    """An image cell could not be read; the message says why and ``status`` names the row status."""

    status = "unreadable"


class ImageTooLargeError(ImageError):
    """An image has more pixels than the cap and cannot be decoded at a size within it."""

    status = "too_large"


def check_max_pixels(max_pixels: int) -> None:
    """Raise ValueError unless ``max_pixels`` is an int of at least `MIN_PIXELS` (a stage config's pixel cap)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < MIN_PIXELS:
        raise ValueError(f"max_pixels must be an integer of at least {MIN_PIXELS} (32x32: no stage can measure a "
                         f"smaller image), got {max_pixels!r}")


def check_png_level(level: int) -> None:
    """Raise ValueError unless ``level`` is a PNG (zlib) compression level, 0 to 9 (a stage config's ``png_level``)."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"png_level must be an integer from 0 (no compression) to 9 (smallest, slowest), got {level!r}")


def load_image(value: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image cell (PIL image, ``{"bytes", "path"}`` dict, bytes or path) as RGB, within a pixel cap.

    The header is read first: an image over ``max_pixels`` is decoded at a reduced size (a JPEG
    decodes at 1/2, 1/4 or 1/8; an image already in memory is `Image.reduce`d) or refused, never
    decoded at full size. EXIF orientation is applied; palette, grayscale, 16-bit, RGBA and CMYK
    images are converted to 8-bit RGB (transparency composited on white).

    Args:
        value: the cell as `datasets` returns it (decoded or not).
        max_pixels: the most pixels (width x height) decoded.

    Returns:
        An RGB `PIL.Image.Image` of at most ``max_pixels`` pixels.

    Raises:
        ImageTooLargeError: for an image that does not fit ``max_pixels`` even reduced.
        ImageError: for a missing value, a missing or empty file, or data that is not a readable image.
    """
    if isinstance(value, Image.Image):  # already decoded: orient, convert, then reduce to the cap
        return _reduce_loaded(_upright_rgb(value, ""), max_pixels)
    with _opened(value) as (image, where):
        _fit(image, max_pixels, where)
        _decode(image, where)
        return _upright_rgb(image, where)


class CellCheck(NamedTuple):
    """What checking a stored image cell found (`check_cell`).

    Attributes:
        reduced: the image reduced to fit the cap, as PNG bytes to store instead; ``None`` keeps the cell as it is.
        digest: the pixel digest (`image_digest`) of what is stored, as `load_image` reads it; ``None`` when it
            decodes but cannot be made RGB (it is kept: a reader gives the row a status).
        pixels: width x height of what is stored (a reader whose cap is below it reads it reduced).
    """

    reduced: bytes | None
    digest: str | None
    pixels: int


def check_cell(value: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> CellCheck:
    """Check that a stored image cell decodes within the cap, as default decoding will read it later, and
    take its pixel digest from the same decode.

    Args:
        value: an undecoded cell (``{"bytes", "path"}`` dict, bytes or path).
        max_pixels: the pixel cap.

    Returns:
        A `CellCheck`: ``reduced`` is ``None`` when the stored data decodes at full size within the cap
        (keep it as it is), else the image reduced to fit (`load_image`), as PNG bytes, to store instead.
        What is kept also stays within Pillow's own decompression-bomb limit, so `datasets` decodes it
        without complaint.

    Raises:
        ImageError: as `load_image` (the cell should become null).
    """
    keep = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    with _opened(value) as (image, where):
        if image.width * image.height <= keep:
            _decode(image, where)
            try:
                digest: str | None = image_digest(_upright_rgb(image, where))
            except ImageError:
                digest = None
            return CellCheck(None, digest, image.width * image.height)
    smaller = _reduce_loaded(load_image(value, max_pixels), keep)
    return CellCheck(png_bytes(smaller), image_digest(smaller), smaller.width * smaller.height)


def png_bytes(image: Image.Image, compress_level: int = -1) -> bytes:
    """``image`` encoded as PNG: how edits are stored, and how a release stores every image.

    Args:
        image: the image.
        compress_level: zlib level 0-9; -1 is zlib's default (6), what `datasets` and a release use; the pixels
            are the same at every level (`RUN_PNG_LEVEL` for a run folder's intermediate images).
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def is_plain_rgb_png(value: Any) -> bool:
    """Whether a stored cell already holds what `load_image` reads, as `png_bytes` would store it: a single-frame
    8-bit RGB PNG without transparency, colour profile or EXIF orientation (from its header alone).

    Raises:
        ImageError: for a missing or empty cell or data that is not an image.
    """
    with _opened(value) as (image, _):
        return (image.format == "PNG" and image.mode == "RGB" and not getattr(image, "is_animated", False)
                and not {"transparency", "icc_profile", "exif"} & set(image.info))


def image_format(value: Any) -> str:
    """The format Pillow names for a stored cell (``"PNG"``, ``"JPEG"`` ...), from its header alone.

    Raises:
        ImageError: for a missing or empty cell or data that is not an image.
    """
    with _opened(value) as (image, _):
        return image.format or "PNG"


def _decode(image: ImageFile.ImageFile, where: str) -> None:
    try:
        image.load()
    except DECODE_ERRORS as err:
        raise ImageError(f"{where}corrupt or truncated {image.format} data ({image.width}x{image.height}): "
                         f"{type(err).__name__}: {err}") from None


@contextmanager
def _opened(value: Any) -> Iterator[tuple[ImageFile.ImageFile, str]]:
    """The image's header (nothing decoded yet) and ``"image '<path>': "`` (empty when no path is known)."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    where = f"image {os.fspath(path)!r}: " if path else ""
    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield _identify(io.BytesIO(bytes(data)), where), where
        return
    if path is None:
        raise ImageError("missing image (a null cell)" if value is None or isinstance(value, dict)
                         else f"unsupported image value of type {type(value).__name__}")
    if not os.path.isfile(path):
        raise ImageError(f"{where}{'not a file' if os.path.exists(path) else 'file not found'}")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed on leaving the block, after the caller decoded
    except OSError as err:
        raise ImageError(f"{where}cannot be read: {err.strerror or err}") from None
    with handle:
        yield _identify(handle, where), where


def _identify(fp: IO[bytes], where: str) -> ImageFile.ImageFile:
    """Read the header with Pillow's format plugins, without decoding pixels.

    This is `Image.open` minus its decompression-bomb check: the caller's ``max_pixels`` is the
    limit, checked right after, before any pixel is decoded (Pillow's global limits stay as they are).
    """
    prefix = fp.read(16)
    if not prefix:
        raise ImageError(f"{where}empty file (0 bytes)")
    Image.init()
    failed = None
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        signed = False  # the data carries this format's signature
        try:
            accepted = accept(prefix) if accept else True
            if fmt in UNSAFE_FORMATS or isinstance(accepted, str) or not accepted:
                continue  # a string is Pillow's "recognised but unsupported" note
            signed = accept is not None
            fp.seek(0)
            return factory(fp, "")
        except DECODE_ERRORS as err:
            if signed:  # a plugin without a signature test failing says nothing about the data
                failed = failed or f"{fmt} header unreadable (truncated or corrupt): {type(err).__name__}: {err}"
    raise ImageError(where + (failed or f"not an image in a format Pillow reads (the data starts with {prefix[:8]!r})"))


def _fit(image: ImageFile.ImageFile, max_pixels: int, where: str) -> None:
    """Make ``image`` decode within ``max_pixels`` (JPEG: at 1/2..1/8 size), or raise `ImageTooLargeError`."""
    w, h = image.size
    if w * h <= max_pixels:
        return
    scale = next((s for s in JPEG_SCALES if -(-w // s) * -(-h // s) <= max_pixels), None)
    if image.format in ("JPEG", "MPO") and scale is not None:
        image.draft(image.mode, (max(1, w // scale), max(1, h // scale)))
        if image.width * image.height <= max_pixels:
            return
    raise ImageTooLargeError(f"{where}{image.format} of {w}x{h} = {w * h:,} pixels exceeds max_pixels={max_pixels:,}"
                             + (" even at 1/8 size" if image.format in ("JPEG", "MPO") else
                                "; it would have to be decoded at full size to be reduced"))


def _reduce_loaded(image: Image.Image, max_pixels: int) -> Image.Image:
    """An image already in memory, `Image.reduce`d by the smallest integer factor that fits ``max_pixels``."""
    w, h = image.size
    factor = 1
    while -(-w // factor) * -(-h // factor) > max_pixels:
        factor += 1
    return image if factor == 1 else image.reduce(factor)


def _upright_rgb(image: Image.Image, where: str) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB."""
    try:
        return _to_rgb(ImageOps.exif_transpose(image))
    except DECODE_ERRORS as err:
        raise ImageError(f"{where}cannot orient or convert a {image.mode} {image.format or 'image'} to RGB: "
                         f"{type(err).__name__}: {err}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        # A fixed 16-bit scale (not the image's own min..max), so an edit keeps every other pixel.
        arr = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(((np.clip(arr, 0, 65535) + 128) // 257).astype("uint8"))
    if image.mode in ("P", "PA") or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def image_digest(image: Image.Image) -> str:
    """A short content hash of an image's pixels (size and mode included)."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:16]
