"""Validation per row: read and size-check a pair, pick its reference, measure the change mask and the pixels outside it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from safetypairs import schema as S
from safetypairs.change import (
    bbox,
    change_mask,
    masked_mean,
    psnr,
    psnr_where,
    resize_mask,
    ssim_map,
    to_float,
)
from safetypairs.images import ImageError, load_image
from safetypairs.policy import Policy
from safetypairs.thresholds import Thresholds
from safetypairs.validate_models import PairImages, row_name, vae_references

logger = logging.getLogger(__name__)

def empty_row() -> dict[str, Any]:
    """A validation output row before anything is measured (not accepted, nothing ran)."""
    row = {name: None for name in S.VALIDATION_FEATURES}
    row.update({S.METRICS_RAN: [], S.ACCEPTED: False, S.CHANGE_BBOX: [], S.VALIDATE_RESIZED: False,
                S.LABEL_FLIP_CHECKED: False})
    return row


def prepare_pair(c: Any, policy: Policy, batch: dict[str, list], i: int, row: dict[str, Any],
                 images: dict[str, list]) -> PairImages | None:
    """Read and size-check one row; on failure fill its status and return ``None``.

    Args:
        c: the `ValidateConfig`.
        policy: the policy the row's category must belong to.
        batch: the input batch.
        i: the row's place in the batch.
        row: its output row (status filled here).
        images: the two image columns of the output; a cell that cannot be decoded is set to null
            (its bytes are not carried on).

    Returns:
        The pair at working resolution, or ``None`` when the row failed.
    """
    name = row_name(batch, i)
    instructed = batch.get(S.INSTRUCT_STATUS, [None] * (i + 1))[i]
    status = batch.get(c.edit_status_column, [None] * (i + 1))[i]
    if instructed not in (None, S.OK):
        error = batch.get(S.INSTRUCT_ERROR, [None] * (i + 1))[i] or f"instruct_status={instructed}"
        return _fail(row, S.NOT_UNSAFE if instructed == S.NOT_UNSAFE else "not_instructed", error)
    if status == S.DUPLICATE:
        return _fail(row, "duplicate_candidate", batch.get(S.EDIT_ERROR, [None] * (i + 1))[i] or status)
    if status is not None and status != S.OK:
        error = batch.get(S.EDIT_ERROR, [None] * (i + 1))[i]
        return _fail(row, "edit_failed", error or f"{name}: {c.edit_status_column}={status}")
    if batch[c.edited_column][i] is None:
        return _fail(row, "edit_failed", f"{name}: no edited image")
    category = batch[c.category_column][i] if c.category_column in batch else None
    if c.category_column in batch and category not in policy.categories:
        return _fail(row, "unknown_category", f"{name}: category {category!r} is not in policy "
                                              f"{policy.id} (allowed: {', '.join(policy.categories)})")
    decoded = []
    for column in (c.original_column, c.edited_column):
        try:
            decoded.append(load_image(batch[column][i], c.max_pixels))
        except ImageError as err:
            images[column][i] = None
            return _fail(row, err.status, f"{name}: {column}: {err}")
    original, edited = decoded
    if original.size != edited.size:
        if c.size_mismatch == "reject":
            return _fail(row, "size_mismatch", f"{name}: original {original.size} vs edited {edited.size}")
        edited = edited.resize(original.size, Image.Resampling.LANCZOS)
        row[S.VALIDATE_RESIZED] = True
    if min(original.size) < c.min_side:
        return _fail(row, "too_small", f"{name}: size {original.size} below min_side={c.min_side}")
    row[S.VALIDATE_STATUS] = S.OK  # measured and decided: see accepted / reject_reason
    work_a, work_b = original, edited
    if _scale(c, original.size) < 1.0:
        work_a, work_b = (im.resize(_work_size(c, original.size), Image.Resampling.BOX) for im in (original, edited))
    control = _control(c, batch, i, original.size) if c.reference != "original" or c.composite else None
    return PairImages(i, to_float(work_a), to_float(work_b), original.size, original, edited,
                      control_image=control)

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

def choose_references(c: Any, batch: dict[str, list], pairs: list[PairImages], device: str) -> None:
    """Pick each pair's reference: control, VAE round trip or original (``c.reference``, `validate.REFERENCE_MODES`).

    Args:
        c: the `ValidateConfig`.
        batch: the input batch (editor and edit work-size columns).
        pairs: the readable pairs; ``reference`` (and ``reference_kind``) are set on each.
        device: where the VAE round trip runs.
    """
    for pair in pairs:
        if c.reference != "original" and pair.control_image is not None:
            pair.reference_image, pair.reference_kind = pair.control_image, "control"
    if c.reference == "auto":
        n = len(batch[c.original_column])
        editors, sizes = batch.get(c.editor_column) or [None] * n, batch.get(S.EDIT_WORK_SIZE) or [None] * n
        vae_references(pairs, [editors[p.index] for p in pairs], [sizes[p.index] for p in pairs], device)
    for pair in pairs:
        if pair.reference_image is None:
            pair.reference = pair.original
            continue
        ref = pair.reference_image
        pair.reference = to_float(ref if _scale(c, ref.size) >= 1.0 else
                                  ref.resize(_work_size(c, ref.size), Image.Resampling.BOX))

def pixel_metrics(c: Any, pair: PairImages, row: dict[str, Any], thresholds: Thresholds) -> None:
    """Measure one pair against its reference: change mask, its size, spread and colour change, SSIM/PSNR outside.

    Args:
        c: the `ValidateConfig` (mask settings).
        pair: the pair (its ``mask`` is set here).
        row: its output row (metric columns and ``metrics_ran`` filled).
        thresholds: the row's thresholds (``mask_delta_e`` decides what counts as changed).
    """
    mask = change_mask(pair.reference, pair.edited, c.mask_params(thresholds))
    pair.mask = mask
    outside = ~mask.region
    full = resize_mask(mask.changed, pair.full_size)
    row[S.EDIT_MASK] = Image.fromarray(full.astype(np.uint8) * 255)  # 2-D uint8: mode "L"
    row[S.CHANGED_FRACTION] = mask.changed_fraction
    row[S.CHANGE_ELEMENT] = mask.element_fraction
    row[S.CHANGE_BBOX] = bbox(full)
    row[S.CHANGE_SPREAD] = mask.spread(c.spread_grid, c.spread_cell_min)
    row[S.COLOR_CHANGE_INSIDE] = masked_mean(mask.delta_e, mask.changed)
    row[S.SSIM_OUTSIDE] = masked_mean(ssim_map(pair.reference, pair.edited), outside)
    row[S.PSNR_OUTSIDE] = psnr_where(pair.reference, pair.edited, outside)
    row[S.VALIDATE_REFERENCE] = pair.reference_kind
    if pair.reference_kind != "original":
        row[S.NOISE_FLOOR_PSNR] = psnr(pair.original, pair.reference)
    row[S.METRICS_RAN] += ["change_mask", "ssim", "psnr"]


def _scale(config: Any, size: tuple[int, int]) -> float:
    return config.max_side / max(size)


def _work_size(config: Any, size: tuple[int, int]) -> tuple[int, int]:
    scale = _scale(config, size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _fail(row: dict[str, Any], status: str, error: str) -> None:
    row.update({S.VALIDATE_STATUS: status, S.REJECT_REASON: status, S.VALIDATE_ERROR: error})
    return None
