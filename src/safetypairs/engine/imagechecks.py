"""Image cells checked once: the run writer's record of each cell it decoded (a digest of the stored bytes, the pixel
digest, the pixel count), carried with the rows so that a later write or digest of the same bytes decodes nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from PIL import Image

from safetypairs.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_cell,
    image_digest,
    is_plain_rgb_png,
    load_image,
    png_bytes,
)


class ImageCheck(NamedTuple):
    """The record of one checked image cell: its stored bytes decode at full size, within the cap it was checked at.

    The record proves nothing about other bytes: it is found by ``sha256`` alone, so a cell whose bytes
    changed (an edit, a composite, a reduced copy) has no record and is checked again.

    Attributes:
        sha256: digest of the stored (encoded) bytes.
        digest: the pixel digest of the image as `images.load_image` reads it (`images.image_digest`);
            ``None`` when it decodes but cannot be made RGB.
        pixels: width x height (a reader with a lower pixel cap reads it reduced, so its digest then differs).
    """

    sha256: str
    digest: str | None
    pixels: int


def bytes_digest(data: bytes) -> str:
    """The digest records are found by: SHA-256 of the stored bytes (hashing is ~50x cheaper than decoding)."""
    return hashlib.sha256(data).hexdigest()[:32]


def recorded(records: Iterable[list[dict[str, Any]] | None]) -> dict[str, ImageCheck]:
    """The records of an ``image_checks`` column (one list of records per row), by bytes digest.

    Args:
        records: the column's values.

    Returns:
        ``{sha256: ImageCheck}`` of every record.
    """
    return {r["sha256"]: ImageCheck(r["sha256"], r["digest"], r["pixels"])
            for row in records if row for r in row}


def check(cell: dict[str, Any], max_pixels: int,
          known: Mapping[str, ImageCheck]) -> tuple[ImageCheck | None, bytes | None]:
    """Check a stored image cell the way `images.check_cell` does, unless a record of the same bytes proves it.

    Args:
        cell: an undecoded ``{"bytes", "path"}`` cell (a path-only cell is read from its file).
        max_pixels: the pixel cap.
        known: records by bytes digest (`recorded`).

    Returns:
        The record of what is to be stored (``None`` when its bytes cannot be read apart from decoding), and the
        reduced PNG bytes to store instead (``None``: keep the cell).

    Raises:
        ImageError: for a cell that cannot be decoded within the cap (it should become null).
    """
    data = _stored_bytes(cell)
    if data is None:  # a missing or unreadable file: the check names why
        return None, check_cell(cell, max_pixels).reduced
    sha = bytes_digest(data)
    record = known.get(sha)
    if record is not None and record.pixels <= max_pixels:
        return record, None
    found = check_cell({"bytes": data, "path": cell.get("path")}, max_pixels)
    if found.reduced is None:
        return ImageCheck(sha, found.digest, found.pixels), None
    return ImageCheck(bytes_digest(found.reduced), found.digest, found.pixels), found.reduced


def pixel_digest(cell: Any, known: Mapping[str, ImageCheck], max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """``images.image_digest(images.load_image(cell, max_pixels))``, taken from a record of the same bytes when
    there is one that ``max_pixels`` reads at full size.

    Args:
        cell: an image cell (undecoded ``{"bytes", "path"}`` dicts can use records).
        known: records by bytes digest (`recorded`).
        max_pixels: the pixel cap of `images.load_image`.

    Returns:
        The pixel digest.

    Raises:
        ImageError: when the cell is not recorded and cannot be read within ``max_pixels``.
    """
    data = cell.get("bytes") if isinstance(cell, dict) else None
    record = known.get(bytes_digest(data)) if data is not None and known else None
    if record is not None and record.digest is not None and record.pixels <= max_pixels:
        return record.digest
    return image_digest(load_image(cell, max_pixels))


def as_rgb_png(cell: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Any, ImageCheck | None]:
    """A cell as a release stores every image: what `images.load_image` reads (the first frame, upright, 8-bit RGB,
    within the cap) encoded as PNG, the way edits are stored, so no image's format or mode tells an original
    from an edit.

    Args:
        cell: an undecoded image cell.
        max_pixels: the pixel cap of `images.load_image`.

    Returns:
        The cell to store (``cell`` itself when its bytes already are such a PNG, or when it cannot be read: the
        writer then nulls it and says why) and the record of the new bytes (``None`` when nothing was
        re-encoded), so that writing them decodes nothing again.
    """
    try:
        if cell is None or is_plain_rgb_png(cell):
            return cell, None
        image = load_image(cell, max_pixels)
    except ImageError:
        return cell, None
    data = png_bytes(image)
    return {"bytes": data, "path": None}, ImageCheck(bytes_digest(data), image_digest(image), image.width * image.height)


def stored_png(image: Any, compress_level: int) -> tuple[dict[str, Any], ImageCheck] | None:
    """A stage's new in-memory image as the PNG cell `datasets` would store for it (at ``compress_level``), with its
    record, so that the run writer decodes nothing to check it.

    Only an image made in memory (no file or format behind it), RGB or L, without transparency or EXIF, is taken: its
    PNG reads back as the same pixels, so the record holds what `images.check_cell` would find in the bytes.

    Args:
        image: a value of an image column of a transform's output.
        compress_level: the zlib level (`images.png_bytes`).

    Returns:
        ``({"bytes", "path": None}, record)``, or ``None`` for any other value (`datasets` stores it as before).
    """
    if not isinstance(image, Image.Image) or image.format is not None or image.mode not in ("RGB", "L") \
            or {"transparency", "exif"} & set(image.info) or getattr(image, "filename", ""):
        return None
    data = png_bytes(image, compress_level)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return {"bytes": data, "path": None}, ImageCheck(bytes_digest(data), image_digest(rgb), image.width * image.height)


def _stored_bytes(cell: dict[str, Any]) -> bytes | None:
    """The bytes a written cell holds: its own, or its local file's (what embedding stores); ``None`` when unreadable."""
    if cell.get("bytes") is not None:
        return cell["bytes"]
    try:
        with open(cell["path"], "rb") as handle:
            return handle.read() or None
    except (OSError, TypeError, ValueError):
        return None
