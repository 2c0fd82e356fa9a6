"""Shared helpers: progress bars, devices per rank, robust image reading, stage mapping."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageOps

logger = logging.getLogger(__name__)
T = TypeVar("T")


def progress_enabled() -> bool:
    """Progress bars show unless ``SAFETYPAIRS_NO_PROGRESS`` is set or datasets' bars are off."""
    if os.environ.get("SAFETYPAIRS_NO_PROGRESS"):
        return False
    from datasets.utils.logging import is_progress_bar_enabled

    return is_progress_bar_enabled()


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap an iterable in the library's one progress bar (tqdm, shared look with `datasets`).

    Args:
        iterable: what to iterate.
        desc: the bar's label.
        total: the length, when the iterable has none.

    Yields:
        The items of ``iterable``.
    """
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, disable=not progress_enabled(), leave=False)


def device_for_rank(device: str, rank: int | None) -> str:
    """Pick the torch device for a `Dataset.map` rank.

    Args:
        device: ``"auto"`` (cuda:<rank mod gpus> when CUDA is available, else cpu) or an
            explicit torch device string, used as given.
        rank: the process rank from ``with_rank=True``; ``None`` in a single process.

    Returns:
        A torch device string.
    """
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{(rank or 0) % torch.cuda.device_count()}"
    return "cpu"


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


class OutputDirError(OSError):
    """An output folder cannot be used: not a folder, not writable, or not empty without overwrite."""


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create (or, with ``overwrite``, empty) an output folder and check that it is writable.

    Args:
        out: the folder.
        overwrite: replace a non-empty folder instead of refusing it.

    Returns:
        The folder as a `Path`.

    Raises:
        OutputDirError: with a one-line reason.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"cannot write to output folder {str(out)!r}: {err.strerror or err}") from err
    return out


def status_histogram(values: Iterable[str | None]) -> dict[str, int]:
    """Count statuses (``None`` counts as ``"ok"``), most common first."""
    return dict(Counter(v or "ok" for v in values).most_common())
