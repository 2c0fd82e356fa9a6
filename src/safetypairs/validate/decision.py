"""The one place a candidate's validation fate is decided: why a row could not be measured, the limits it is held
to (each rejection names the measured value and the limit), the judge's label flip, acceptance, and the best
candidate of each source.

Every name written here is a word of `safetypairs.statuses`. A row gets one ``validate_status`` (``ok`` when
measured and decided) and one fate, ``reject_reason`` (``None`` when accepted); a row that stopped before
validation keeps the status of the stage that stopped it as its fate, so the funnel and the card say the same.
"""

from __future__ import annotations

import json
import math
from typing import Any

from datasets import Dataset

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.validate.thresholds import Thresholds


def stop(row: dict[str, Any], status: str, error: str, reason: str | None = None) -> None:
    """A row that cannot be measured: ``validate_status`` ``status``, fate ``reason`` (default: the same word).

    Args:
        row: the output row (changed in place).
        status: a validate status of `statuses` (``not_edited``, ``unreadable``, ``size_mismatch``, ...).
        error: the detail naming the row, into ``validate_error``.
        reason: the fate when it differs from ``status`` (a row stopped upstream keeps that stage's status).
    """
    row.update({S.VALIDATE_STATUS: status, S.REJECT_REASON: reason or status, S.VALIDATE_ERROR: error})


def upstream_stop(instruct_status: str | None, edit_status: str | None) -> str | None:
    """The status of the stage that stopped a row before validation (its fate), or ``None`` when none did.

    The first stop counts: a row the instruct stage stopped (``unknown_category``, ``not_unsafe``...) has edit
    status ``not_instructed``, and its fate is the instruct status.
    """
    for status in (instruct_status, edit_status):
        if status not in (None, ST.OK):
            return status
    return None


def _fmt(value: float) -> str:
    return f"{value:.4g}"  # 4 significant digits; a NaN reads "nan"


def _over(row: dict[str, Any], column: str, limit: float | None) -> str | None:
    value = row.get(column)
    if limit is None or value is None or not (math.isnan(value) or value > limit):
        return None
    return f"{column} {_fmt(value)} > {_fmt(limit)}"


def _under(row: dict[str, Any], column: str, limit: float | None) -> str | None:
    value = row.get(column)
    if limit is None or value is None or not (math.isnan(value) or value < limit):
        return None
    return f"{column} {_fmt(value)} < {_fmt(limit)}"


def decide_pixels(thresholds: Thresholds, row: dict[str, Any]) -> tuple[str | None, str | None]:
    """The fate from the measured metrics alone, with the numbers that decided it.

    Order: ``not_local`` (change too large or too spread out), ``background_changed`` (a metric outside
    the dilated mask past its limit, also when the mask is empty: a global change under the ΔE threshold;
    a NaN metric fails), then ``no_change`` (no connected change as large as ``min_element_fraction``).

    Args:
        thresholds: the limits.
        row: a row with the metric columns filled.

    Returns:
        ``(reason, detail)``: e.g. ``("background_changed", "psnr_outside 29.1 < 32.5")``, or ``(None, None)``.
    """
    t = thresholds
    checks = [
        (ST.NOT_LOCAL, [_over(row, S.CHANGED_FRACTION, t.max_changed_fraction),
                        _over(row, S.CHANGE_SPREAD, t.max_change_spread)]),
        (ST.BACKGROUND_CHANGED, [_under(row, S.SSIM_OUTSIDE, t.min_ssim_outside),
                                 _under(row, S.PSNR_OUTSIDE, t.min_psnr_outside),
                                 _under(row, S.CLIP_OUTSIDE, t.min_clip_outside),
                                 _over(row, S.LPIPS_OUTSIDE, t.max_lpips_outside)]),
        (ST.NO_CHANGE, [_under(row, S.CHANGE_ELEMENT, t.min_element_fraction)]),
    ]
    for reason, failed in checks:
        failed = [f for f in failed if f]
        if failed:
            return reason, "; ".join(failed)
    return None, None


def judge_reason(original: str, edited: str) -> str | None:
    """The label-flip decision: ``None`` when the original is unsafe and the edit safe.

    Returns:
        ``judge_unknown``, ``original_not_unsafe``, ``still_unsafe`` or ``None``.
    """
    if S.UNKNOWN in (original, edited):
        return ST.JUDGE_UNKNOWN
    if original != S.UNSAFE:
        return ST.ORIGINAL_NOT_UNSAFE
    if edited == S.UNSAFE:
        return ST.STILL_UNSAFE
    return None


def decide_judge(row: dict[str, Any], judge: str, original: str, edited: str) -> None:
    """Record the judge's label flip as the row's fate unless the pixels already decided it (in place)."""
    row[S.LABEL_FLIP_CHECKED] = True
    reason = judge_reason(original, edited)
    if row[S.REJECT_REASON] is None and reason is not None:
        row[S.REJECT_REASON] = reason
        row[S.REJECT_DETAIL] = f"judge {judge}: original {original}, edit {edited}"


def judge_failed(row: dict[str, Any], error: str, status: str = ST.JUDGE_ERROR) -> None:
    """A judge that raised (``judge_error``) or could not answer (``api_error``): that status; the fate too unless
    the pixels already rejected the row."""
    row.update({S.VALIDATE_STATUS: status, S.REJECT_REASON: row[S.REJECT_REASON] or status, S.VALIDATE_ERROR: error})


def limits_json(thresholds: Thresholds) -> str:
    """The limits a row was decided with, as the JSON its ``validate_limits`` column keeps."""
    return json.dumps(thresholds.as_dict(), sort_keys=True)


def accept(row: dict[str, Any]) -> None:
    """The final word of validation: accepted when measured (status ``ok``) and no reason stands (in place)."""
    row[S.ACCEPTED] = row[S.VALIDATE_STATUS] == ST.OK and row[S.REJECT_REASON] is None


def preservation_key(row: dict[str, Any]) -> tuple[float, float, float]:
    """Sort key, larger = better preserved: (-lpips_outside or -1 when absent, ssim_outside, psnr_outside)."""
    lpips_out, ssim_out, psnr_out = row.get(S.LPIPS_OUTSIDE), row.get(S.SSIM_OUTSIDE), row.get(S.PSNR_OUTSIDE)
    return (-1.0 if lpips_out is None else -lpips_out, -1.0 if ssim_out is None else ssim_out, psnr_out or 0.0)


def select_best(dataset: Dataset) -> Dataset:
    """Best-of-K: per ``source_id`` keep the accepted candidate with the best `preservation_key`.

    Ties go to the earlier row. Only non-image columns are read.

    Args:
        dataset: validated candidates.

    Returns:
        At most one row per source, in the original row order.
    """
    cols = [c for c in (S.SOURCE_ID, S.ACCEPTED, S.LPIPS_OUTSIDE, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE)
            if c in dataset.column_names]
    table = dataset.select_columns(cols).to_dict()
    best: dict[str, tuple[tuple[float, float, float], int]] = {}
    for i in range(len(dataset)):
        row = {c: table[c][i] for c in cols}
        if not row[S.ACCEPTED]:
            continue
        key = preservation_key(row)
        src = row[S.SOURCE_ID]
        if src not in best or key > best[src][0]:  # strictly better: a tie keeps the earlier row
            best[src] = (key, i)
    return dataset.select(sorted(i for _, i in best.values()))
