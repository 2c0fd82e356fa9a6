"""Plain reference implementations of validation's pixel measurements, as validation computed them before they were
made fast: scikit-image's SSIM, numpy ΔE and boolean-indexed means, morphology over the whole image.

tests/test_change.py checks `safetypairs.validate.change` against these; benchmarks/bench_validate_host.py times
them as the "before" side.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from safetypairs.validate.change import MaskParams


def delta_e(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIE76 ΔE of two float32 RGB arrays in [0, 1], ``HxW``."""
    lab_a, lab_b = cv2.cvtColor(a, cv2.COLOR_RGB2Lab), cv2.cvtColor(b, cv2.COLOR_RGB2Lab)
    return np.sqrt(((lab_a - lab_b) ** 2).sum(axis=2))


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def change_mask(original: np.ndarray, edited: np.ndarray, p: MaskParams) -> tuple[np.ndarray, np.ndarray, float]:
    """``(changed, region, element_fraction)`` of `safetypairs.validate.change.change_mask`, every step over the
    whole image (the code validation ran before the morphology was limited to the changed box)."""
    delta = delta_e(original, edited)
    mask = (delta > p.delta_e).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(p.open_px)) if p.open_px > 0 else mask
    min_area = p.min_region_fraction * mask.size
    if min_area > 1 and mask.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(count, dtype=np.uint8)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        mask = keep[labels]
    strong = (delta > 2 * p.delta_e).astype(np.uint8)
    if min_area > 1 and strong.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(strong, connectivity=8)
        erased = np.ones(count, dtype=bool)
        erased[np.unique(labels[mask > 0])] = False
        thin = np.concatenate([[False], (stats[1:, cv2.CC_STAT_AREA] >= min_area) & erased[1:]])
        mask = mask | thin[labels].astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(p.close_px)) if p.close_px > 0 else mask
    element = 0.0
    if mask.any():
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        element = float(stats[1:, cv2.CC_STAT_AREA].max()) / mask.size
    margin = max(p.dilate_min_px, round(p.dilate_fraction * min(mask.shape)))
    region = cv2.dilate(mask, _disk(margin)) if margin > 0 else mask
    return mask > 0, region > 0, element


def ssim_map(original: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """scikit-image's per-pixel SSIM (its defaults: 7x7 uniform window) averaged over RGB, ``HxW``."""
    return structural_similarity(original, edited, channel_axis=2, data_range=1.0, full=True)[1].mean(axis=2)


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean of ``values`` where ``mask`` is true, ``None`` for an empty mask."""
    return float(values[mask].mean()) if mask.any() else None


def psnr_db(mse: float) -> float:
    """PSNR in dB of a mean squared error (data range 1), 100 for identical pixels."""
    return 100.0 if mse <= 1e-10 else min(100.0, 10.0 * float(np.log10(1.0 / mse)))


def psnr_where(original: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR over the pixels where ``mask`` is true (boolean-indexed), ``None`` for an empty mask."""
    return psnr_db(float(((original[mask] - edited[mask]) ** 2).mean())) if mask.any() else None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two whole images."""
    return psnr_db(float(np.mean(np.square(a - b))))
