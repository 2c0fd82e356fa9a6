"""Robust image reading: any cell `datasets` gives (decoded or not) to 8-bit RGB, and pixel digests."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

from PIL import Image, ImageOps


class ImageError(ValueError):
    """An image cell could not be read; the message says why (the row gets a status)."""


def load_image(value: Any) -> Image.Image:
    """Read an image cell (PIL image, ``{"bytes", "path"}`` dict, bytes or path) as RGB.

    EXIF orientation is applied; palette, grayscale, 16-bit, RGBA and CMYK images are converted
    to 8-bit RGB (transparency composited on white).

    Args:
        value: the cell as `datasets` returns it (decoded or not).

    Returns:
        An RGB `PIL.Image.Image`.

    Raises:
        ImageError: for a missing value, a missing file or bytes that are not an image.
    """
    try:
        if value is None:
            raise ImageError("missing image")
        if isinstance(value, dict):
            if value.get("bytes"):
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                raise ImageError("image cell has neither bytes nor path")
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            if not os.path.isfile(value):
                raise ImageError(f"image file not found: {value}")
            image = Image.open(value)
        elif isinstance(value, Image.Image):
            image = value
        else:
            raise ImageError(f"unsupported image value of type {type(value).__name__}")
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageError(f"unreadable image: {type(err).__name__}: {err}") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        # A fixed 16-bit scale (not the image's own min..max), so an edit keeps every other pixel.
        arr = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255)
        image = Image.fromarray(np.round(arr).astype("uint8"))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def image_digest(image: Image.Image) -> str:
    """A short content hash of an image's pixels (size and mode included)."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:16]
