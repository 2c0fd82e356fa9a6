"""Compositing: paste each measured edit (and control) back onto its original outside the feathered change mask."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from safetypairs import schema as S
from safetypairs.validate.change import composite, feather, resize_mask
from safetypairs.validate.pair import PairImages


def composite_columns(config: Any, batch: dict[str, list], pairs: list[PairImages],
                      rows: list[dict[str, Any]]) -> dict[str, list]:
    """The edited (and control) columns with every measured pair composited onto its original.

    Inside the feathered, dilated change mask the edit (control) is kept, outside it the original,
    bit for bit; rows that were not measured keep their cells, and so does an edit (control) that compositing
    leaves pixel for pixel as it was (its stored bytes, and so reviewers' decisions on it, stay valid).
    ``metrics_ran`` gains ``composite``.

    Args:
        config: column names and ``feather_px``.
        batch: the input batch (cells of rows that are not composited are returned as they are).
        pairs: the measured pairs, with their masks.
        rows: output rows, indexed by ``pair.index`` (``metrics_ran`` is appended to).

    Returns:
        ``{edited_column: [...], control_column: [...]}`` (the control only when the batch has it).
    """
    out = {config.edited_column: list(batch[config.edited_column])}
    has_control = config.control_column in batch
    if has_control:
        out[config.control_column] = list(batch[config.control_column])
    for pair in pairs:
        alpha = feather(resize_mask(pair.mask.region, pair.full_size), config.feather_px)
        _paste(out[config.edited_column], pair.index, pair.original_image, pair.edited_image, alpha)
        if has_control and pair.control_image is not None:
            _paste(out[config.control_column], pair.index, pair.original_image, pair.control_image, alpha)
        rows[pair.index][S.METRICS_RAN].append("composite")
    return out


def _paste(cells: list, index: int, original: Image.Image, edited: Image.Image, alpha: np.ndarray) -> None:
    """``cells[index]`` becomes the composite of ``edited`` onto ``original``, unless that is ``edited`` itself."""
    pasted = composite(original, edited, alpha)
    if pasted.size != edited.size or pasted.mode != edited.mode or not np.array_equal(np.asarray(pasted),
                                                                                        np.asarray(edited)):
        cells[index] = pasted
