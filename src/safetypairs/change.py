"""Pixel-level change measurements for a pair: Lab change mask, SSIM/PSNR outside it, colour change inside."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

PSNR_IDENTICAL = 100.0  # dB reported when the compared pixels are identical (instead of infinity)


@dataclass(frozen=True)
class MaskParams:
    """How the change mask is built (see `ValidateConfig` for the documented defaults)."""

    delta_e: float
    open_px: int
    close_px: int
    min_region_fraction: float
    dilate_fraction: float
    dilate_min_px: int


@dataclass
class ChangeMask:
    """The change between two images of one size.

    Attributes:
        delta_e: per-pixel CIE76 colour difference in CIELAB, ``HxW``.
        changed: the cleaned change mask (what changed), ``HxW`` bool.
        region: ``changed`` dilated by the safety margin (what counts as edited), ``HxW`` bool.
    """

    delta_e: np.ndarray
    changed: np.ndarray
    region: np.ndarray

    @property
    def changed_fraction(self) -> float:
        """Share of pixels in the cleaned mask."""
        return float(self.changed.mean())

    def spread(self, grid: int = 8, cell_min: float = 0.01) -> float:
        """Share of the cells of a ``grid x grid`` partition with more than ``cell_min`` of their
        pixels changed: a local edit touches few cells, a global change (shift, blur, codec) many."""
        h, w = self.changed.shape
        ys = np.linspace(0, h, grid + 1).astype(int)
        xs = np.linspace(0, w, grid + 1).astype(int)
        sums = np.add.reduceat(np.add.reduceat(self.changed.astype(np.int32), ys[:-1], axis=0), xs[:-1], axis=1)
        areas = np.outer(np.diff(ys), np.diff(xs))
        return float((sums > cell_min * np.maximum(areas, 1)).mean())


def to_float(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as a float32 ``HxWx3`` array in ``[0, 1]``."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def change_mask(original: np.ndarray, edited: np.ndarray, params: MaskParams) -> ChangeMask:
    """Threshold the CIELAB difference, clean it up morphologically and add a dilation margin.

    Steps: ΔE (CIE76) > ``delta_e``; opening (radius ``open_px``) drops speckle; connected
    regions smaller than ``min_region_fraction`` of the image are dropped; closing (radius
    ``close_px``) fills holes such as the inside of letters; the margin is
    ``max(dilate_min_px, dilate_fraction * min(H, W))`` pixels.

    Args:
        original: float32 ``HxWx3`` in ``[0, 1]``.
        edited: same shape as ``original``.
        params: the mask parameters.

    Returns:
        The `ChangeMask`.
    """
    lab_a = cv2.cvtColor(original, cv2.COLOR_RGB2Lab)
    lab_b = cv2.cvtColor(edited, cv2.COLOR_RGB2Lab)
    delta = np.sqrt(((lab_a - lab_b) ** 2).sum(axis=2))
    mask = (delta > params.delta_e).astype(np.uint8)
    if params.open_px > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(params.open_px))
    min_area = params.min_region_fraction * mask.size
    if min_area > 1 and mask.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(count, dtype=np.uint8)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        mask = keep[labels]
    if params.close_px > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(params.close_px))
    margin = max(params.dilate_min_px, round(params.dilate_fraction * min(mask.shape)))
    region = cv2.dilate(mask, _disk(margin)) if margin > 0 else mask
    return ChangeMask(delta_e=delta, changed=mask.astype(bool), region=region.astype(bool))


def bbox(mask: np.ndarray) -> list[int]:
    """``[x0, y0, x1, y1]`` (exclusive end) of a bool mask; ``[]`` when it is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return []
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean of ``values`` (``HxW``) where ``mask`` is true; ``None`` for an empty mask."""
    return float(values[mask].mean()) if mask.any() else None


def ssim_map(original: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (7x7 window, averaged over RGB), ``HxW``."""
    _, full = structural_similarity(original, edited, channel_axis=2, data_range=1.0, full=True)
    return full.mean(axis=2)


def psnr_where(original: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR (dB, data range 1) over the pixels where ``mask`` is true; `PSNR_IDENTICAL` when equal."""
    if not mask.any():
        return None
    mse = float(((original[mask] - edited[mask]) ** 2).mean())
    return PSNR_IDENTICAL if mse <= 1e-10 else min(PSNR_IDENTICAL, 10.0 * float(np.log10(1.0 / mse)))


def blank_region(image: np.ndarray, region: np.ndarray, value: float = 0.5) -> Image.Image:
    """Copy of ``image`` with ``region`` filled with flat grey, as a PIL image."""
    out = image.copy()
    out[region] = value
    return Image.fromarray((out * 255.0 + 0.5).astype(np.uint8))
