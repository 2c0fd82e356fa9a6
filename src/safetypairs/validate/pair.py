"""A pair under validation: read and size-check one row (or say why it cannot be measured), at working resolution."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.images import ImageError, load_image
from safetypairs.policy import Policy
from safetypairs.validate.change import ChangeMask, to_float
from safetypairs.validate.decision import stop, upstream_stop
from safetypairs.validate.originals import Originals

logger = logging.getLogger(__name__)


@dataclass
class PairImages:
    """One readable row of a validation batch: float arrays at working resolution, PIL images at full size.

    ``reference`` is what the edit is compared with: the original, the artifact control (same editor
    and seed, no-op instruction) or the original's round trip through the editor's VAE. ``original_key``
    names the original in `Originals` (candidates of one source share it), ``reference_key`` the reference
    when the candidates share it too (the original or its round trip; ``None`` for a control); ``original``,
    ``original_image`` and a shared reference are shared with those candidates' pairs, never changed in place.
    """

    index: int
    original: np.ndarray
    edited: np.ndarray
    full_size: tuple[int, int]
    original_image: Image.Image
    edited_image: Image.Image
    mask: ChangeMask | None = None
    control_image: Image.Image | None = None
    reference_image: Image.Image | None = None
    reference: np.ndarray | None = None
    reference_kind: str = "original"
    original_key: str = ""
    reference_key: tuple | None = None


def row_name(batch: dict[str, list], i: int) -> str:
    """How an error names a row: ``row '<source_id or pair_id>' (candidate N)``, else its place in the batch."""
    for column in (S.SOURCE_ID, S.PAIR_ID):
        if batch.get(column) and batch[column][i] is not None:
            candidate = batch.get(S.CANDIDATE, [None] * (i + 1))[i]
            return f"row {batch[column][i]!r}" + (f" (candidate {candidate})" if candidate is not None else "")
    return f"row #{i} of its batch"


def empty_row() -> dict[str, Any]:
    """A validation output row before anything is measured (not accepted, nothing ran)."""
    row = {name: None for name in S.VALIDATION_FEATURES}
    row.update({S.METRICS_RAN: [], S.ACCEPTED: False, S.CHANGE_BBOX: [], S.VALIDATE_RESIZED: False,
                S.LABEL_FLIP_CHECKED: False})
    return row


def prepare_pair(c: Any, policy: Policy, batch: dict[str, list], i: int, row: dict[str, Any],
                 images: dict[str, list], originals: Originals) -> PairImages | None:
    """Read and size-check one row; on failure fill its status and return ``None``.

    Args:
        c: the `ValidateConfig`.
        policy: the policy the row's category must belong to.
        batch: the input batch.
        i: the row's place in the batch.
        row: its output row (status filled here).
        images: the two image columns of the output; a cell that cannot be decoded is set to null
            (its bytes are not carried on).
        originals: the originals decoded so far in this run (the row's original is decoded once per source).

    Returns:
        The pair at working resolution, or ``None`` when the row failed.
    """
    name = row_name(batch, i)
    cell = lambda col: batch.get(col, [None] * (i + 1))[i]  # noqa: E731 - a column the input may lack
    stopped = upstream_stop(cell(S.INSTRUCT_STATUS), cell(c.edit_status_column))
    if stopped is not None:
        error = cell(S.EDIT_ERROR) if stopped == cell(c.edit_status_column) else cell(S.INSTRUCT_ERROR)
        return stop(row, ST.NOT_EDITED, error or f"{name}: stopped before validation ({stopped})", reason=stopped)
    if batch[c.edited_column][i] is None:
        return stop(row, ST.NOT_EDITED, f"{name}: no edited image")
    category = batch[c.category_column][i] if c.category_column in batch else None
    if c.category_column in batch and policy.resolve(category) is None:  # as the instruct stage resolves it
        return stop(row, ST.UNKNOWN_CATEGORY, f"{name}: category {category!r} is not in policy "
                                             f"{policy.id} (allowed: {', '.join(policy.categories)}, "
                                             "'<code>: <name>', the names or a category's aliases)")
    column = c.original_column
    try:
        original_cell = batch[column][i]
        key, original, work_original = originals.decode(original_cell, c.max_pixels, lambda: _read(c, original_cell))
        column = c.edited_column
        edited = load_image(batch[column][i], c.max_pixels)
    except ImageError as err:
        images[column][i] = None
        return stop(row, err.status, f"{name}: {column}: {err}")
    if original.size != edited.size:
        if c.size_mismatch == "reject":
            return stop(row, ST.SIZE_MISMATCH, f"{name}: original {original.size} vs edited {edited.size}")
        edited = edited.resize(original.size, Image.Resampling.LANCZOS)
        row[S.VALIDATE_RESIZED] = True
    if min(original.size) < c.min_side:
        return stop(row, ST.TOO_SMALL, f"{name}: size {original.size} below min_side={c.min_side}")
    row[S.VALIDATE_STATUS] = ST.OK  # measured and decided: see accepted / reject_reason
    control = _control(c, batch, i, original.size) if c.reference != "original" or c.composite else None
    return PairImages(i, work_original, at_work_size(c, edited), original.size, original, edited,
                      control_image=control, original_key=key)


def _read(c: Any, cell: Any) -> tuple[Image.Image, np.ndarray]:
    """An original cell decoded, and its float copy at working resolution."""
    image = load_image(cell, c.max_pixels)
    return image, at_work_size(c, image)


def _control(c: Any, batch: dict[str, list], i: int, size: tuple[int, int]) -> Image.Image | None:
    """The row's artifact control, or ``None`` (absent, not wanted, unreadable or of another size)."""
    column = c.control_column
    cell = batch[column][i] if column in batch else None
    if cell is None:
        return None
    try:
        control = load_image(cell)
    except ImageError as err:
        logger.warning("row %d: control image unreadable (%s); not used as the reference", i, err)
        return None
    if control.size != size:
        logger.warning("row %d: control %s differs from the original %s; not used", i, control.size, size)
        return None
    return control


def working_scale(config: Any, size: tuple[int, int]) -> float:
    return config.max_side / max(size)


def working_size(config: Any, size: tuple[int, int]) -> tuple[int, int]:
    scale = working_scale(config, size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def at_work_size(config: Any, image: Image.Image) -> np.ndarray:
    """``image`` as the float array it is measured as: box-reduced to ``config.max_side`` when it is larger."""
    if working_scale(config, image.size) < 1.0:
        image = image.resize(working_size(config, image.size), Image.Resampling.BOX)
    return to_float(image)
