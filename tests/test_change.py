"""Pixel-level change measurements: thin elements in the mask, feathered compositing."""

import numpy as np
import pytest
from PIL import Image

from safetypairs.validate.change import MaskParams, change_mask, composite, feather, to_float

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
