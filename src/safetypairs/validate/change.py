"""Pixel-level change measurements for a pair: Lab change mask, SSIM/PSNR outside it, colour change inside.

Everything here runs on OpenCV's vectorised kernels (about 0.1 s of one core for a 1 MP pair; the scikit-image
SSIM and boolean-indexed means it replaces took 0.5 s): ``python benchmarks/bench_validate_host.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from safetypairs.utils import opencv

cv2 = opencv()

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
        total = cv2.integral(self.changed.view(np.uint8))[np.ix_(ys, xs)]  # changed pixels above-left of each corner
        sums = total[1:, 1:] - total[:-1, 1:] - total[1:, :-1] + total[:-1, :-1]
        areas = np.outer(np.diff(ys), np.diff(xs))
        return float((sums > cell_min * np.maximum(areas, 1)).mean())


def to_float(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as a float32 ``HxWx3`` array in ``[0, 1]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    array /= np.float32(255.0)
    return array


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def to_lab(image: np.ndarray) -> np.ndarray:
    """CIELAB (OpenCV's float conversion) of a float32 ``HxWx3`` RGB array in ``[0, 1]``, ``HxWx3`` float32."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2Lab)


def delta_e(a: np.ndarray, b: np.ndarray, lab_a: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel CIE76 colour difference in CIELAB of two float32 ``HxWx3`` RGB arrays in ``[0, 1]``, ``HxW``
    (float32, the squares summed L, a, b in that order, as ``((lab_a - lab_b) ** 2).sum(axis=2)`` sums them).
    ``lab_a``: `to_lab` of ``a`` when the caller has it (an original measured against several edits)."""
    diff = cv2.subtract(to_lab(a) if lab_a is None else lab_a, to_lab(b))
    np.square(diff, out=diff)
    total = diff[..., 0] + diff[..., 1]
    total += diff[..., 2]
    return np.sqrt(total, out=total)


def change_mask(original: np.ndarray, edited: np.ndarray, params: MaskParams,
                original_lab: np.ndarray | None = None) -> ChangeMask:
    """Threshold the CIELAB difference, clean it up morphologically and add a dilation margin.

    Steps: ΔE (CIE76) > ``delta_e``; opening (radius ``open_px``) drops speckle; connected
    regions smaller than ``min_region_fraction`` of the image are dropped; thin elements the
    opening erased whole (a removed antenna) are put back when their ΔE is above ``2 * delta_e``
    and they reach ``min_region_fraction``; closing (radius ``close_px``) fills holes such as the
    inside of letters; the margin is ``max(dilate_min_px, dilate_fraction * min(H, W))`` pixels.

    The morphology runs on the box around the thresholded pixels, widened by every radius it uses: nothing
    outside it can become part of the mask, so the result is the same as on the whole image, bit for bit.

    Args:
        original: float32 ``HxWx3`` in ``[0, 1]``.
        edited: same shape as ``original``.
        params: the mask parameters.
        original_lab: `to_lab` of ``original`` when the caller has it (computed here otherwise).

    Returns:
        The `ChangeMask`.
    """
    delta = delta_e(original, edited, original_lab)
    above = (delta > params.delta_e).view(np.uint8)
    changed = np.zeros(delta.shape, np.uint8)
    region = np.zeros(delta.shape, np.uint8)
    margin = max(params.dilate_min_px, round(params.dilate_fraction * min(delta.shape)))
    element = 0.0
    box = bbox(above)
    if box:
        reach = margin + 2 * max(params.open_px, params.close_px) + 1  # how far any step below looks or grows
        x0, y0, x1, y1 = box
        window = (slice(max(0, y0 - reach), y1 + reach), slice(max(0, x0 - reach), x1 + reach))
        mask = _clean(above[window], delta[window], params, params.min_region_fraction * delta.size)
        if mask.any():
            _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            element = float(stats[1:, cv2.CC_STAT_AREA].max()) / delta.size
        changed[window] = mask
        region[window] = cv2.dilate(mask, _disk(margin)) if margin > 0 else mask
    return ChangeMask(delta_e=delta, changed=changed.view(bool), region=region.view(bool), element_fraction=element)


def _clean(mask: np.ndarray, delta: np.ndarray, params: MaskParams, min_area: float) -> np.ndarray:
    """The thresholded ``mask`` (uint8) opened, without small regions, with thin strong changes put back, closed."""
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(params.open_px)) if params.open_px > 0 else mask
    if min_area > 1 and mask.any():
        mask = _large_components(mask, min_area)
    strong = (delta > 2 * params.delta_e).view(np.uint8)
    if min_area > 1 and strong.any():  # thin, clear changes the opening erased whole (a removed antenna)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(strong, connectivity=8)
        erased = np.ones(count, dtype=bool)
        erased[np.unique(labels[mask > 0])] = False
        thin = np.concatenate([[False], (stats[1:, cv2.CC_STAT_AREA] >= min_area) & erased[1:]])
        mask = mask | thin[labels].astype(np.uint8)
    if params.close_px > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(params.close_px))
    return mask


def _large_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_area`` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, dtype=np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def bbox(mask: np.ndarray) -> list[int]:
    """``[x0, y0, x1, y1]`` (exclusive end) of a bool (or 0/1) mask; ``[]`` when it is empty."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return []
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean of ``values`` (``HxW``) where ``mask`` is true, summed in float64; ``None`` for an empty mask."""
    if not mask.any():
        return None
    return float(cv2.mean(values.astype(np.float32, copy=False), mask.view(np.uint8))[0])


def ssim_map(original: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM averaged over RGB, ``HxW`` float32, of two float32 ``HxWx3`` arrays in ``[0, 1]``.

    The SSIM of ``skimage.metrics.structural_similarity(original, edited, channel_axis=2, data_range=1.0,
    full=True)`` (its defaults: a 7x7 uniform window, sample covariance (49/48), K1 = 0.01, K2 = 0.03, the
    border mirrored as ``scipy.ndimage.uniform_filter`` mirrors it, ``dcb|abcd``), the same formula in float32
    on OpenCV box filters (``BORDER_REFLECT`` is that mirror). Both round in float32 in different places: per
    pixel the two agree within 1e-3 (on photos about 3e-4 at most), and the mean over any region within 1e-5
    (tests/test_change.py checks both against scikit-image on photos and edits).
    """
    n = np.float32(49 / 48)  # sample covariance over the 7x7 window
    c1, c2 = np.float32(0.01 ** 2), np.float32(0.03 ** 2)
    box = lambda image: cv2.boxFilter(image, -1, (7, 7), borderType=cv2.BORDER_REFLECT)  # noqa: E731
    mean_a, mean_b = box(original), box(edited)
    mean_ab = cv2.multiply(mean_a, mean_b)
    squares = cv2.multiply(mean_a, mean_a)
    cv2.accumulateSquare(mean_b, squares)  # ux² + uy²
    covariance = cv2.addWeighted(box(cv2.multiply(original, edited)), 2 * n, mean_ab, -2 * n, c2)  # 2 vxy + C2
    energy = cv2.multiply(original, original)
    cv2.accumulateSquare(edited, energy)  # the box filter is linear: box(x²) + box(y²) in one filter
    variances = cv2.addWeighted(box(energy), n, squares, -n, c2)  # vx + vy + C2
    numerator = cv2.multiply(cv2.addWeighted(mean_ab, 2, mean_ab, 0, c1), covariance)  # (2 ux uy + C1)(2 vxy + C2)
    squares += c1
    ssim = cv2.divide(numerator, cv2.multiply(squares, variances))
    return cv2.transform(ssim, np.full((1, 3), 1 / 3, np.float32))


def _mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel squared difference averaged over the channels, ``HxW`` float32."""
    diff = cv2.subtract(a, b)
    return cv2.transform(cv2.multiply(diff, diff), np.full((1, 3), 1 / 3, np.float32))


def _psnr(mse: float) -> float:
    return PSNR_IDENTICAL if mse <= 1e-10 else min(PSNR_IDENTICAL, 10.0 * float(np.log10(1.0 / mse)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, data range 1) of two whole images; `PSNR_IDENTICAL` when equal."""
    return _psnr(cv2.norm(a, b, cv2.NORM_L2SQR) / a.size)


def psnr_where(original: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float | None:
    """PSNR (dB, data range 1) over the pixels where ``mask`` is true; `PSNR_IDENTICAL` when equal."""
    mse = masked_mean(_mse(original, edited), mask)
    return None if mse is None else _psnr(mse)


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
