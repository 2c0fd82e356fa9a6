"""Property-based tests (hypothesis) of pure functions: metrics against scikit-learn and plain Python, policy
category resolution, and the change mask."""

from __future__ import annotations

import math
import string
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from sklearn import metrics as skm

from safetypairs.evaluate.metrics import compute_metrics
from safetypairs.policy import PolicyError, load_policy, parse_policy
from safetypairs.validate.change import change_mask, to_float
from safetypairs.validate.stage import ValidateConfig
from safetypairs.validate.thresholds import PRESETS

FAST = settings(max_examples=60, deadline=None, database=None)  # small and fast; no example files left behind

# ------------------------------------------------------------------------------------------ metrics

# (reference, prediction) per image: references 1 unsafe / 0 safe; predictions 1, 0 or -1 (unknown); and how
# many images a pair holds (2, or 3 as with an extra edit), so pairs hold any mix of labels
IMAGES = st.tuples(st.lists(st.tuples(st.sampled_from([0, 1]), st.sampled_from([0, 1, -1])), min_size=1, max_size=40),
                   st.sampled_from([2, 3]))


def _columns(images: tuple[list[tuple[int, int]], int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """References, predictions and pair ids."""
    labels, per_pair = images
    ref, pred = (np.array(column) for column in zip(*labels))
    return ref, pred, [f"p{i // per_pair}" for i in range(len(ref))]


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


@FAST
@given(IMAGES)
def test_image_metrics_equal_sklearn_on_any_labels(images):
    ref, pred, pairs = _columns(images)
    r = compute_metrics(pred.tolist(), ref.tolist(), pairs, n_bootstrap=0)
    binary = np.where(pred == -1, 1 - ref, pred)  # an unknown prediction is the wrong label (the documented rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about single-class inputs; the values are what we compare
        expected = {
            "accuracy": skm.accuracy_score(ref, binary),
            "balanced_accuracy": skm.balanced_accuracy_score(ref, binary),
            # precision: sklearn's zero_division=0 where unsafe images exist but none was flagged, else undefined
            "precision": skm.precision_score(ref, binary, zero_division=0 if (ref == 1).any() else np.nan),
            "recall": skm.recall_score(ref, binary, zero_division=np.nan),
            "specificity": skm.recall_score(ref, binary, pos_label=0, zero_division=np.nan),
            "f1": skm.f1_score(ref, binary, zero_division=np.nan),
        }
    for key, value in expected.items():
        assert _nan(r[key]) == pytest.approx(value, nan_ok=True), key
    tn, fp, fn, tp = skm.confusion_matrix(ref, binary, labels=[0, 1]).ravel()
    assert r["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


@FAST
@given(IMAGES, st.data())
def test_auroc_equals_sklearn_with_ties(images, data):
    ref, pred, pairs = _columns(images)
    assume(0 < ref.sum() < len(ref))
    scores = data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), min_size=len(ref), max_size=len(ref)))
    r = compute_metrics(pred.tolist(), ref.tolist(), pairs, scores=scores, n_bootstrap=0)
    assert r["auroc"] == pytest.approx(skm.roc_auc_score(ref, scores))


@FAST
@given(IMAGES)
def test_pair_metrics_equal_a_plain_python_count(images):
    ref, pred, pairs = _columns(images)
    r = compute_metrics(pred.tolist(), ref.tolist(), pairs, n_bootstrap=0)
    groups: dict[str, list[tuple[int, int]]] = {}
    for p, x, y in zip(pairs, ref, pred):
        groups.setdefault(p, []).append((int(x), int(y)))
    both = [g for g in groups.values() if {x for x, _ in g} == {0, 1}]  # a pair holds an unsafe and a safe image
    right = sum(all(x == y for x, y in g) for g in both)
    same = sum(len({y for _, y in g}) == 1 for g in both)
    flagged = [g for g in both if all(y == 1 for x, y in g if x == 1)]
    flipped = sum(all(y == 0 for x, y in g if x == 0) for g in flagged)
    assert r["n_pairs"] == len(both)
    assert _nan(r["pair_accuracy"]) == pytest.approx(right / len(both) if both else math.nan, nan_ok=True)
    assert _nan(r["same_label_rate"]) == pytest.approx(same / len(both) if both else math.nan, nan_ok=True)
    assert _nan(r["flip_detection_rate"]) == pytest.approx(flipped / len(flagged) if flagged else math.nan,
                                                           nan_ok=True)


# ------------------------------------------------------------------------------------- policy resolution

LLAVAGUARD = load_policy("llavaguard")


@FAST
@given(st.text(max_size=40))
def test_resolve_never_names_a_code_outside_the_policy(text):
    assert LLAVAGUARD.resolve(text) in {*LLAVAGUARD.categories, None}


@FAST
@given(st.sampled_from(list(LLAVAGUARD.categories.values())), st.sampled_from([str.lower, str.upper, str.title]),
       st.sampled_from(["", " ", "  "]))
def test_resolve_maps_every_form_of_a_category_to_its_code(category, case, pad):
    forms = [category.code, f"{category.code}: {category.name}", category.name, *category.aliases]
    for form in forms:
        assert LLAVAGUARD.resolve(pad + case(form) + pad) == category.code, form


WORD = st.text(alphabet=string.ascii_letters, min_size=2, max_size=8)
CATEGORY = st.fixed_dictionaries({"name": st.lists(WORD, min_size=1, max_size=3).map(" ".join),
                                  "aliases": st.lists(st.lists(WORD, min_size=1, max_size=2).map(" ".join), max_size=2)})


@FAST
@given(st.dictionaries(st.from_regex(r"[A-Z][0-9]{1,2}", fullmatch=True), CATEGORY, min_size=1, max_size=5),
       st.text(max_size=30))
def test_any_policy_resolves_its_own_labels_and_nothing_outside_it(categories, text):
    data = {"name": "p", "version": 1, "categories": {
        code: {"name": c["name"], "should_not": ["x"], "aliases": c["aliases"]} for code, c in categories.items()}}
    try:
        policy = parse_policy(data)
    except PolicyError:  # a name or alias that two categories share is refused (tested in test_policy)
        assume(False)
    assert policy.resolve(text) in {*policy.categories, None}
    for code, category in policy.categories.items():
        for form in (code, code.lower(), f"{code}: {category.name}", category.name, *category.aliases):
            assert policy.resolve(form) == code, form


# ---------------------------------------------------------------------------------------------- change mask

MASK = ValidateConfig().mask_params(PRESETS["pixel-exact"])


def _photo(width: int, height: int) -> Image.Image:
    from skimage import data as skdata

    return Image.fromarray(skdata.chelsea()).convert("RGB").resize((width, height))


@FAST
@given(st.integers(16, 80), st.integers(16, 80), st.integers(0, 2**32 - 1))
def test_the_change_mask_of_identical_images_is_empty(width, height, seed):
    noise = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    for image in (noise, to_float(_photo(width, height))):
        mask = change_mask(image, image.copy(), MASK)
        assert not mask.changed.any() and not mask.region.any()
        assert mask.changed_fraction == 0.0 and mask.element_fraction == 0.0


BOX = st.tuples(st.integers(0, 40), st.integers(0, 30), st.integers(1, 24), st.integers(1, 24))


@FAST
@given(BOX, st.integers(0, 16), st.integers(0, 16), st.tuples(*[st.integers(0, 255)] * 3))
def test_the_change_mask_grows_as_the_edited_region_grows(box, grow_x, grow_y, colour):
    """A paint box inside a larger paint box of the same colour never marks less of the image as changed."""
    photo = _photo(64, 48)
    x, y, w, h = box
    small, large = photo.copy(), photo.copy()
    ImageDraw.Draw(small).rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
    ImageDraw.Draw(large).rectangle((x, y, x + w - 1 + grow_x, y + h - 1 + grow_y), fill=colour)
    original = to_float(photo)
    a, b = change_mask(original, to_float(small), MASK), change_mask(original, to_float(large), MASK)
    assert b.changed_fraction >= a.changed_fraction
    assert b.region.sum() >= a.region.sum()
