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
        element_fraction: share of the image covered by the largest connected region of ``changed``
            (the changed element; a thin one the opening would erase is kept when it is clear).
    """

    delta_e: np.ndarray
    changed: np.ndarray
    region: np.ndarray
    element_fraction: float = 0.0

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


def delta_e(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel CIE76 colour difference in CIELAB of two float32 ``HxWx3`` RGB arrays in ``[0, 1]``, ``HxW``."""
    lab_a = cv2.cvtColor(a, cv2.COLOR_RGB2Lab)
    lab_b = cv2.cvtColor(b, cv2.COLOR_RGB2Lab)
    return np.sqrt(((lab_a - lab_b) ** 2).sum(axis=2))


def change_mask(original: np.ndarray, edited: np.ndarray, params: MaskParams) -> ChangeMask:
    """Threshold the CIELAB difference, clean it up morphologically and add a dilation margin.

    Steps: ΔE (CIE76) > ``delta_e``; opening (radius ``open_px``) drops speckle; connected
    regions smaller than ``min_region_fraction`` of the image are dropped; thin elements the
    opening erased whole (a removed antenna) are put back when their ΔE is above ``2 * delta_e``
    and they reach ``min_region_fraction``; closing (radius ``close_px``) fills holes such as the
    inside of letters; the margin is ``max(dilate_min_px, dilate_fraction * min(H, W))`` pixels.

    Args:
        original: float32 ``HxWx3`` in ``[0, 1]``.
        edited: same shape as ``original``.
        params: the mask parameters.

    Returns:
        The `ChangeMask`.
    """
    delta = delta_e(original, edited)
    mask = (delta > params.delta_e).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(params.open_px)) if params.open_px > 0 else mask
    min_area = params.min_region_fraction * mask.size
    if min_area > 1 and mask.any():
        mask = _large_components(mask, min_area)
    strong = (delta > 2 * params.delta_e).astype(np.uint8)
    if min_area > 1 and strong.any():  # thin, clear changes the opening erased whole (a removed antenna)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(strong, connectivity=8)
        erased = np.ones(count, dtype=bool)
        erased[np.unique(labels[mask > 0])] = False
        thin = np.concatenate([[False], (stats[1:, cv2.CC_STAT_AREA] >= min_area) & erased[1:]])
        mask = mask | thin[labels].astype(np.uint8)
    if params.close_px > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(params.close_px))
    element = 0.0
    if mask.any():
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        element = float(stats[1:, cv2.CC_STAT_AREA].max()) / mask.size
    margin = max(params.dilate_min_px, round(params.dilate_fraction * min(mask.shape)))
    region = cv2.dilate(mask, _disk(margin)) if margin > 0 else mask
    return ChangeMask(delta_e=delta, changed=mask.astype(bool), region=region.astype(bool), element_fraction=element)


def _large_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_area`` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, dtype=np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, data range 1) of two whole images; `PSNR_IDENTICAL` when equal."""
    mse = float(np.mean(np.square(a - b)))
    return PSNR_IDENTICAL if mse <= 1e-10 else min(PSNR_IDENTICAL, 10.0 * float(np.log10(1.0 / mse)))


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


def feather(region: np.ndarray, feather_px: int) -> np.ndarray:
    """A soft alpha for compositing: 1 on ``region``, falling linearly to exactly 0 at ``feather_px + 1``
    pixels from it (Euclidean distance), ``HxW`` float32."""
    if not region.any():
        return np.zeros(region.shape, np.float32)
    distance = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.clip(1.0 - distance / (feather_px + 1.0), 0.0, 1.0).astype(np.float32)


def composite(original: Image.Image, edited: Image.Image, alpha: np.ndarray) -> Image.Image:
    """``edited`` where ``alpha`` is 1, ``original`` where it is 0 (bit for bit), blended between.

    Args:
        original: the image kept outside the mask.
        edited: the image taken inside it (same size).
        alpha: ``HxW`` weights of ``edited`` in ``[0, 1]`` (see `feather`).

    Returns:
        The RGB composite.
    """
    base = np.asarray(original.convert("RGB"))
    out = base.copy()
    inside = alpha > 0
    a = alpha[inside][:, None]
    blend = base[inside] * (1.0 - a) + np.asarray(edited.convert("RGB"))[inside] * a
    out[inside] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized (nearest) to ``size`` = ``(width, height)``; the same array when it already fits."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
