"""Pixel-level change measurements: thin elements in the mask, feathered compositing, and the fast measurements
equal to plain reference implementations (scikit-image's SSIM, numpy, whole-image morphology) on real photos."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

import reference_metrics as plain
from safetypairs.validate.change import (
    MaskParams,
    bbox,
    change_mask,
    composite,
    delta_e,
    feather,
    masked_mean,
    psnr,
    psnr_where,
    ssim_map,
    to_float,
    to_lab,
)

PARAMS = MaskParams(8.0, 1, 3, 0.0005, 0.02, 5)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from safetypairs.sources import demo_photo

    return demo_photo("coffee").resize((384, 288))


def test_thin_line_survives_the_speckle_opening(photo):
    arr = np.asarray(photo).copy()
    arr[60:120, 200] = (10, 10, 10)  # a 1-px line, 60 px long: the opening alone would erase it
    mask = change_mask(to_float(Image.fromarray(arr)), to_float(photo), PARAMS)
    assert mask.changed[60:120, 200].all()
    assert mask.element_fraction == pytest.approx(mask.changed_fraction)
    faint = np.asarray(photo).astype(np.int16)
    faint[60:120, 200] += 6  # below the ΔE threshold: not a change
    mask = change_mask(to_float(Image.fromarray(np.clip(faint, 0, 255).astype(np.uint8))), to_float(photo), PARAMS)
    assert mask.element_fraction == 0.0 and not mask.changed.any()


def test_element_is_the_largest_connected_change(photo):
    arr = np.asarray(photo).copy()
    arr[10:30, 10:30] = 0
    arr[200:210, 300:310] = 255
    mask = change_mask(to_float(photo), to_float(Image.fromarray(arr)), PARAMS)
    assert mask.element_fraction == pytest.approx(400 / (384 * 288), rel=0.1)
    assert mask.changed_fraction > mask.element_fraction


def test_feather_is_one_inside_and_zero_beyond_its_width():
    region = np.zeros((50, 60), bool)
    region[20:30, 20:30] = True
    alpha = feather(region, 4)
    assert (alpha[region] == 1).all()
    assert alpha[25, 33] == pytest.approx(1 - 4 / 5) and alpha[25, 34] == 0 and alpha[25, 40] == 0  # 4 px from it
    assert (alpha[:14] == 0).all()
    assert not feather(np.zeros((5, 5), bool), 4).any()


def test_composite_is_bit_exact_outside(photo):
    edited = Image.fromarray(255 - np.asarray(photo))
    region = np.zeros((288, 384), bool)
    region[100:150, 100:200] = True
    alpha = feather(region, 6)
    out = np.asarray(composite(photo, edited, alpha))
    assert np.array_equal(out[alpha == 0], np.asarray(photo)[alpha == 0])
    assert np.array_equal(out[region], np.asarray(edited)[region])
    edge = (alpha > 0) & (alpha < 1)
    between = (out[edge].astype(int) - np.asarray(photo)[edge]) * (out[edge].astype(int) - np.asarray(edited)[edge])
    assert (between <= 0).all()  # blended values lie between the two images


def _edits(photo: Image.Image) -> dict[str, np.ndarray]:
    """Edits of a real photo: local ones (a pasted patch, one at the corner, a thin line) and global ones."""
    arr = np.asarray(photo)
    h, w = arr.shape[:2]
    patch, corner, line = arr.copy(), arr.copy(), arr.copy()
    patch[h // 3: h // 3 + 50, w // 2: w // 2 + 70] = (20, 200, 40)
    corner[: 40, w - 30:] = (250, 250, 250)  # the mask and its margin reach the image's edges
    line[20: 90, w // 4] = (5, 5, 5)  # 1 px wide: the opening erases it, the strong-change rule puts it back
    noise = np.clip(arr + np.random.default_rng(0).normal(0, 4, arr.shape), 0, 255).astype(np.uint8)
    scattered = arr.copy()
    for k in range(12):  # many small patches: several components, some dropped as too small
        y, x = 15 + 19 * k % (h - 30), 10 + 37 * k % (w - 30)
        scattered[y: y + 2 + k, x: x + 2 + k] = (200, 20, 20)
    return {"patch": patch, "corner": corner, "line": line, "noise": noise, "scattered": scattered,
            "blur": np.asarray(photo.filter(ImageFilter.GaussianBlur(1.5))), "identical": arr.copy()}


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_fast_measurements_equal_the_plain_reference_on_photos(name):
    """SSIM per pixel within 1e-3 of scikit-image's (as `ssim_map` documents) and its mean outside the mask
    within 1e-5; ΔE, the mask, its margin and element bit for bit; PSNR within 1e-4 dB."""
    from safetypairs.sources import demo_photo

    photo = demo_photo(name).resize((320, 240))
    original = to_float(photo)
    for edit, arr in _edits(photo).items():
        edited = to_float(Image.fromarray(arr))
        assert np.array_equal(delta_e(original, edited), plain.delta_e(original, edited)), edit
        reference, fast = plain.ssim_map(original, edited), ssim_map(original, edited)
        assert fast.shape == reference.shape and np.abs(fast - reference).max() < 1e-3, edit
        assert psnr(original, edited) == pytest.approx(plain.psnr(original, edited), abs=1e-4), edit
        for params in (PARAMS, MaskParams(8.0, 1, 3, 0.0005, 0.1, 5), MaskParams(4.0, 0, 0, 0.0, 0.0, 0)):
            where = f"{name}/{edit}/{params}"
            mask = change_mask(original, edited, params)
            again = change_mask(original, edited, params, to_lab(original))  # the original's CIELAB kept for K edits
            assert np.array_equal(again.delta_e, mask.delta_e) and np.array_equal(again.region, mask.region), where
            changed, region, element = plain.change_mask(original, edited, params)
            assert np.array_equal(mask.changed, changed) and np.array_equal(mask.region, region), where
            assert mask.element_fraction == element, where
            ys, xs = np.nonzero(changed)
            assert bbox(mask.changed) == ([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if ys.size else []), where
            outside = ~mask.region
            if outside.any():  # SSIM and PSNR outside the mask, as validation reports them
                expected = plain.masked_mean(reference, outside)
                assert masked_mean(fast, outside) == pytest.approx(expected, abs=1e-5), where
                assert psnr_where(original, edited, outside) == pytest.approx(
                    plain.psnr_where(original, edited, outside), abs=1e-4), where


def test_measurements_of_an_empty_mask_are_none_and_identical_images_score_their_maximum(photo):
    image = to_float(photo)
    empty = np.zeros(image.shape[:2], bool)
    assert masked_mean(image[..., 0], empty) is None and psnr_where(image, image, empty) is None
    assert masked_mean(ssim_map(image, image), ~empty) == pytest.approx(1.0, abs=1e-6)
    assert psnr(image, image) == 100.0 and psnr_where(image, image, ~empty) == 100.0
