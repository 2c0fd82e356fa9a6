"""The one place a row's validation fate is decided (validate/decision.py), on hand-built rows: each limit and its
boundary, the order of the reasons, the numbers in the detail, the judge's label flip, acceptance and best-of-K."""

import json
import math

import pytest
from datasets import Dataset

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.validate.decision import (
    accept,
    decide_judge,
    decide_pixels,
    judge_failed,
    judge_reason,
    limits_json,
    preservation_key,
    select_best,
    stop,
    upstream_stop,
)
from safetypairs.validate.thresholds import Thresholds

LIMITS = Thresholds(min_element_fraction=0.001, max_changed_fraction=0.35, max_change_spread=0.5,
                    min_ssim_outside=0.91, min_psnr_outside=32.5, max_lpips_outside=0.1, min_clip_outside=0.9)


def _measured(**values: float | None) -> dict:
    """A measured row within every limit of `LIMITS`, with ``values`` in place of the measured ones."""
    row = {S.CHANGED_FRACTION: 0.1, S.CHANGE_SPREAD: 0.2, S.SSIM_OUTSIDE: 0.95, S.PSNR_OUTSIDE: 40.0,
           S.LPIPS_OUTSIDE: 0.05, S.CLIP_OUTSIDE: 0.95, S.CHANGE_ELEMENT: 0.05}
    return {**row, **values}


def test_a_row_within_every_limit_has_no_reason():
    assert decide_pixels(LIMITS, _measured()) == (None, None)


@pytest.mark.parametrize("column, value, reason, detail", [
    (S.CHANGED_FRACTION, 0.4, ST.NOT_LOCAL, "changed_fraction 0.4 > 0.35"),
    (S.CHANGE_SPREAD, 0.75, ST.NOT_LOCAL, "change_spread 0.75 > 0.5"),
    (S.SSIM_OUTSIDE, 0.9, ST.BACKGROUND_CHANGED, "ssim_outside 0.9 < 0.91"),
    (S.PSNR_OUTSIDE, 29.123456, ST.BACKGROUND_CHANGED, "psnr_outside 29.12 < 32.5"),  # 4 significant digits
    (S.LPIPS_OUTSIDE, 0.2, ST.BACKGROUND_CHANGED, "lpips_outside 0.2 > 0.1"),
    (S.CLIP_OUTSIDE, 0.5, ST.BACKGROUND_CHANGED, "clip_outside 0.5 < 0.9"),
    (S.CHANGE_ELEMENT, 0.0005, ST.NO_CHANGE, "change_element_fraction 0.0005 < 0.001"),
    (S.SSIM_OUTSIDE, math.nan, ST.BACKGROUND_CHANGED, "ssim_outside nan < 0.91"),  # a NaN metric fails its limit
    (S.LPIPS_OUTSIDE, math.nan, ST.BACKGROUND_CHANGED, "lpips_outside nan > 0.1"),
    (S.CHANGED_FRACTION, math.nan, ST.NOT_LOCAL, "changed_fraction nan > 0.35"),
])
def test_each_limit_rejects_with_its_reason_and_numbers(column, value, reason, detail):
    assert decide_pixels(LIMITS, _measured(**{column: value})) == (reason, detail)


@pytest.mark.parametrize("column, limit", [
    (S.CHANGED_FRACTION, 0.35), (S.CHANGE_SPREAD, 0.5), (S.SSIM_OUTSIDE, 0.91), (S.PSNR_OUTSIDE, 32.5),
    (S.LPIPS_OUTSIDE, 0.1), (S.CLIP_OUTSIDE, 0.9), (S.CHANGE_ELEMENT, 0.001),
])
def test_a_value_at_its_limit_passes_and_an_unmeasured_one_is_not_judged(column, limit):
    assert decide_pixels(LIMITS, _measured(**{column: limit})) == (None, None)
    assert decide_pixels(LIMITS, _measured(**{column: None})) == (None, None)  # e.g. LPIPS did not run


def test_an_optional_limit_left_unset_is_not_applied():
    loose = Thresholds(max_lpips_outside=None, min_clip_outside=None)
    assert decide_pixels(loose, _measured(**{S.LPIPS_OUTSIDE: 0.9, S.CLIP_OUTSIDE: -0.5})) == (None, None)


def test_reasons_come_in_order_and_a_reason_names_every_failed_limit():
    everything = _measured(**{S.CHANGED_FRACTION: 0.5, S.CHANGE_SPREAD: 0.9, S.SSIM_OUTSIDE: 0.5,
                              S.CHANGE_ELEMENT: 0.0})
    assert decide_pixels(LIMITS, everything) == (ST.NOT_LOCAL, "changed_fraction 0.5 > 0.35; change_spread 0.9 > 0.5")
    background = _measured(**{S.SSIM_OUTSIDE: 0.5, S.PSNR_OUTSIDE: 20.0, S.CLIP_OUTSIDE: 0.1, S.LPIPS_OUTSIDE: 0.3,
                              S.CHANGE_ELEMENT: 0.0})
    assert decide_pixels(LIMITS, background) == (
        ST.BACKGROUND_CHANGED, "ssim_outside 0.5 < 0.91; psnr_outside 20 < 32.5; clip_outside 0.1 < 0.9; "
                               "lpips_outside 0.3 > 0.1")


@pytest.mark.parametrize("original, edited, reason", [
    ("unsafe", "safe", None),
    ("unsafe", "unsafe", ST.STILL_UNSAFE),
    ("safe", "safe", ST.ORIGINAL_NOT_UNSAFE),
    ("safe", "unsafe", ST.ORIGINAL_NOT_UNSAFE),
    ("unknown", "safe", ST.JUDGE_UNKNOWN),
    ("unsafe", "unknown", ST.JUDGE_UNKNOWN),
    ("safe", "unknown", ST.JUDGE_UNKNOWN),
])
def test_judge_reason(original, edited, reason):
    assert judge_reason(original, edited) == reason


def test_the_judge_decides_only_rows_the_pixels_did_not_reject():
    flipped = {S.REJECT_REASON: None, S.REJECT_DETAIL: None}
    decide_judge(flipped, "ocr-lexicon", "unsafe", "safe")
    assert flipped == {S.REJECT_REASON: None, S.REJECT_DETAIL: None, S.LABEL_FLIP_CHECKED: True}
    still = {S.REJECT_REASON: None, S.REJECT_DETAIL: None}
    decide_judge(still, "ocr-lexicon", "unsafe", "unsafe")
    assert still == {S.REJECT_REASON: ST.STILL_UNSAFE, S.LABEL_FLIP_CHECKED: True,
                     S.REJECT_DETAIL: "judge ocr-lexicon: original unsafe, edit unsafe"}
    local = {S.REJECT_REASON: ST.NOT_LOCAL, S.REJECT_DETAIL: "changed_fraction 0.5 > 0.35"}
    decide_judge(local, "ocr-lexicon", "safe", "unsafe")
    assert local == {S.REJECT_REASON: ST.NOT_LOCAL, S.REJECT_DETAIL: "changed_fraction 0.5 > 0.35",
                     S.LABEL_FLIP_CHECKED: True}


def test_a_judge_that_raised():
    measured = {S.VALIDATE_STATUS: ST.OK, S.REJECT_REASON: None, S.VALIDATE_ERROR: None}
    judge_failed(measured, "judge x failed: RuntimeError")
    assert measured == {S.VALIDATE_STATUS: ST.JUDGE_ERROR, S.REJECT_REASON: ST.JUDGE_ERROR,
                        S.VALIDATE_ERROR: "judge x failed: RuntimeError"}
    rejected = {S.VALIDATE_STATUS: ST.OK, S.REJECT_REASON: ST.NOT_LOCAL, S.VALIDATE_ERROR: None}
    judge_failed(rejected, "boom")
    assert rejected[S.REJECT_REASON] == ST.NOT_LOCAL and rejected[S.VALIDATE_STATUS] == ST.JUDGE_ERROR


def test_stop_and_upstream_stop():
    row: dict = {}
    stop(row, ST.NOT_EDITED, "row #0: no edited image")
    assert row == {S.VALIDATE_STATUS: ST.NOT_EDITED, S.REJECT_REASON: ST.NOT_EDITED,
                   S.VALIDATE_ERROR: "row #0: no edited image"}
    stop(row, ST.NOT_EDITED, "blocked", reason="edit_error")
    assert row == {S.VALIDATE_STATUS: ST.NOT_EDITED, S.REJECT_REASON: "edit_error", S.VALIDATE_ERROR: "blocked"}
    assert upstream_stop(None, None) is None and upstream_stop(ST.OK, ST.OK) is None
    assert upstream_stop("unknown_category", "not_instructed") == "unknown_category"  # the first stop counts
    assert upstream_stop(ST.OK, "edit_error") == "edit_error" and upstream_stop(None, "edit_error") == "edit_error"


@pytest.mark.parametrize("status, reason, accepted", [
    (ST.OK, None, True), (ST.OK, ST.NOT_LOCAL, False), (ST.JUDGE_ERROR, None, False), (ST.NOT_EDITED, None, False),
])
def test_accept(status, reason, accepted):
    row = {S.VALIDATE_STATUS: status, S.REJECT_REASON: reason}
    accept(row)
    assert row[S.ACCEPTED] is accepted


def test_limits_json_keeps_every_limit_by_name():
    assert limits_json(Thresholds()) == (
        '{"mask_delta_e": 8.0, "max_change_spread": 0.5, "max_changed_fraction": 0.35, "max_lpips_outside": null, '
        '"min_clip_outside": null, "min_element_fraction": 0.0005, "min_psnr_outside": 32.5, "min_ssim_outside": 0.91}')
    assert json.loads(limits_json(LIMITS))["max_lpips_outside"] == 0.1


def test_preservation_key():
    row = {S.LPIPS_OUTSIDE: 0.1, S.SSIM_OUTSIDE: 0.9, S.PSNR_OUTSIDE: 30.0}
    assert preservation_key(row) == (-0.1, 0.9, 30.0)
    assert preservation_key({}) == (-1.0, -1.0, 0.0)
    assert preservation_key({S.LPIPS_OUTSIDE: 0.0, S.SSIM_OUTSIDE: 0.0, S.PSNR_OUTSIDE: None}) == (0.0, 0.0, 0.0)


def test_select_best_keeps_the_best_preserved_accepted_candidate_of_each_source():
    rows = [  # source, accepted, lpips_outside, ssim_outside, psnr_outside
        ("a", True, 0.20, 0.90, 30.0), ("a", True, 0.10, 0.80, 25.0), ("a", False, 0.01, 0.99, 50.0),  # a: 1
        ("b", True, 0.10, 0.90, 30.0), ("b", True, 0.10, 0.95, 20.0), ("b", True, 0.10, 0.95, 40.0),  # b: 5
        ("c", False, 0.05, 0.99, 40.0),  # c: none accepted
        ("d", True, None, 0.99, 45.0), ("d", True, 0.30, 0.70, 20.0),  # d: a measured LPIPS beats none: 8
        ("e", True, 0.10, 0.90, 30.0), ("e", True, 0.10, 0.90, 30.0),  # e: a tie goes to the earlier row: 9
        ("f", True, None, None, None), ("f", True, None, 0.5, None),  # f: SSIM when no LPIPS: 12
    ]
    columns = (S.SOURCE_ID, S.ACCEPTED, S.LPIPS_OUTSIDE, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE)
    data = Dataset.from_dict({"i": list(range(len(rows))), **{c: list(v) for c, v in zip(columns, zip(*rows))}})
    assert select_best(data)["i"] == [1, 5, 8, 9, 12]
