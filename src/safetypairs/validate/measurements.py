"""Measuring a pair against its reference: the change mask, its size, spread and colour change, SSIM/PSNR outside it,
and the model-backed LPIPS (inside/outside) and CLIP (the edit blanked)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from safetypairs import schema as S
from safetypairs.backends.registry import load_backend
from safetypairs.validate.change import (
    bbox,
    blank_region,
    change_mask,
    masked_mean,
    psnr,
    psnr_where,
    resize_mask,
    ssim_map,
    to_lab,
)
from safetypairs.validate.originals import Originals
from safetypairs.validate.pair import PairImages
from safetypairs.validate.thresholds import Thresholds

logger = logging.getLogger(__name__)

_UNAVAILABLE: dict[tuple[str, str], str] = {}  # (encoder spec, device) -> why it could not load here


def pixel_metrics(c: Any, pair: PairImages, row: dict[str, Any], thresholds: Thresholds,
                  originals: Originals) -> None:
    """Measure one pair against its reference: change mask, its size, spread and colour change, SSIM/PSNR outside.

    Args:
        c: the `ValidateConfig` (mask settings).
        pair: the pair (its ``mask`` is set here).
        row: its output row (metric columns and ``metrics_ran`` filled).
        thresholds: the row's thresholds (``mask_delta_e`` decides what counts as changed).
        originals: the CIELAB values of references shared by candidates (converted once per reference).
    """
    lab = None
    if pair.reference_key is not None:
        lab = originals.labs.get(pair.reference_key)
        if lab is None:
            lab = to_lab(pair.reference)
            originals.labs.put(pair.reference_key, lab)
    mask = change_mask(pair.reference, pair.edited, c.mask_params(thresholds), lab)
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


def load_encoder(spec: str, device: str) -> Any | None:
    """Load an encoder, or ``None`` (with one warning per process) when it cannot be built.

    A missing download (no network for LPIPS' backbone or a hub CLIP) must not stop validation:
    the row's ``metrics_ran`` then lacks the metric and decisions use the metrics that ran.

    Args:
        spec: an ``encoders`` spec.
        device: torch device.

    Returns:
        The encoder or ``None``.

    Raises:
        ValueError: for a bad spec or option (a configuration error, never skipped).
    """
    key = (spec, device)
    if key in _UNAVAILABLE:
        return None
    try:
        return load_backend("encoders", spec, device)
    except ValueError:
        raise
    except Exception as err:  # weights missing offline, hub errors, ...: skip the metric
        _UNAVAILABLE[key] = f"{type(err).__name__}: {err}"
        logger.warning("encoder %s unavailable on %s (%s); validating without it", spec, device, _UNAVAILABLE[key])
        return None


def encoder_metrics(config: Any, pairs: list[PairImages], rows: list[dict[str, Any]], device: str) -> None:
    """Fill ``lpips_outside/inside`` and ``clip_outside`` for measured pairs (in place), edit vs reference.

    Args:
        config: which encoders to run.
        pairs: readable pairs with their change masks.
        rows: output rows, indexed by ``pair.index``.
        device: torch device for the encoders.
    """
    lpips_enc = load_encoder(config.lpips, device) if config.lpips and pairs else None
    if lpips_enc is not None:
        fits = [p for p in pairs if min(p.original.shape[:2]) >= lpips_enc.min_side]
        maps = lpips_enc.distance_maps([p.reference for p in fits], [p.edited for p in fits])
        for pair, dist in zip(fits, maps):
            row = rows[pair.index]
            row[S.LPIPS_OUTSIDE] = masked_mean(dist, ~pair.mask.region)
            row[S.LPIPS_INSIDE] = masked_mean(dist, pair.mask.changed)
            row[S.METRICS_RAN].append(lpips_enc.name)
    clip_enc = load_encoder(config.clip, device) if config.clip and pairs else None
    if clip_enc is not None:
        blanked = [blank_region(p.reference, p.mask.region) for p in pairs]
        blanked += [blank_region(p.edited, p.mask.region) for p in pairs]
        emb = clip_enc.embed(blanked)
        cosine = np.sum(emb[: len(pairs)] * emb[len(pairs):], axis=1)
        for pair, cos in zip(pairs, cosine):
            rows[pair.index][S.CLIP_OUTSIDE] = float(cos)
            rows[pair.index][S.METRICS_RAN].append(clip_enc.name)
