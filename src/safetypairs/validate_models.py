"""Model-backed validation metrics: LPIPS inside/outside the mask, CLIP with the edit blanked, judge flip."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from safetypairs import schema as S
from safetypairs.change import ChangeMask, blank_region, masked_mean
from safetypairs.policy import cached_policy
from safetypairs.registry import load_backend
from safetypairs.stage import isolate

logger = logging.getLogger(__name__)

JUDGE_ERROR = "judge_error"  # validate_status of a row the judge raised on

_UNAVAILABLE: dict[tuple[str, str], str] = {}


@dataclass
class PairImages:
    """One readable row of a validation batch: float arrays at working resolution, PIL images at full size."""

    index: int
    original: np.ndarray
    edited: np.ndarray
    full_size: tuple[int, int]
    original_image: Image.Image
    edited_image: Image.Image
    mask: ChangeMask | None = None


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
    """Fill ``lpips_outside/inside`` and ``clip_outside`` for measured pairs (in place).

    Args:
        config: which encoders to run.
        pairs: readable pairs with their change masks.
        rows: output rows, indexed by ``pair.index``.
        device: torch device for the encoders.
    """
    lpips_enc = load_encoder(config.lpips, device) if config.lpips and pairs else None
    if lpips_enc is not None:
        fits = [p for p in pairs if min(p.original.shape[:2]) >= lpips_enc.min_side]
        maps = lpips_enc.distance_maps([p.original for p in fits], [p.edited for p in fits])
        for pair, dist in zip(fits, maps):
            row = rows[pair.index]
            row[S.LPIPS_OUTSIDE] = masked_mean(dist, ~pair.mask.region)
            row[S.LPIPS_INSIDE] = masked_mean(dist, pair.mask.changed)
            row[S.METRICS_RAN].append(lpips_enc.name)
    clip_enc = load_encoder(config.clip, device) if config.clip and pairs else None
    if clip_enc is not None:
        blanked = [blank_region(p.original, p.mask.region) for p in pairs]
        blanked += [blank_region(p.edited, p.mask.region) for p in pairs]
        emb = clip_enc.embed(blanked)
        cosine = np.sum(emb[: len(pairs)] * emb[len(pairs):], axis=1)
        for pair, cos in zip(pairs, cosine):
            rows[pair.index][S.CLIP_OUTSIDE] = float(cos)
            rows[pair.index][S.METRICS_RAN].append(clip_enc.name)


def judge_reason(original: str, edited: str) -> str | None:
    """The label-flip decision: ``None`` when the original is unsafe and the edit safe.

    Args:
        original: the judge's label for the original.
        edited: the judge's label for the edit.

    Returns:
        ``judge_unknown``, ``original_not_unsafe``, ``still_unsafe`` or ``None``.
    """
    if S.UNKNOWN in (original, edited):
        return "judge_unknown"
    if original != S.UNSAFE:
        return "original_not_unsafe"
    if edited == S.UNSAFE:
        return "still_unsafe"
    return None


def verdict_json(verdict: Any) -> str:
    """A judge `Verdict` as a JSON string for the ``judge_*_raw`` columns."""
    return json.dumps({"label": verdict.label, "score": verdict.score, "rationale": verdict.rationale,
                       "raw": verdict.raw}, ensure_ascii=False)


def judge_rows(config: Any, batch: dict[str, list], pairs: list[PairImages], rows: list[dict[str, Any]],
               device: str) -> None:
    """Classify originals and edits with the judge and set the label-flip reject reason (in place).

    Rows the pixel checks rejected are skipped unless ``config.judge_all_rows``. A row the judge
    raises on gets ``validate_status=judge_error`` (reject reason ``judge_error`` unless the pixels
    already rejected it) and the error in ``validate_error``; the other rows are judged as usual.

    Args:
        config: judge spec, policy and category column.
        batch: the input batch (for categories).
        pairs: readable pairs (full-resolution PIL images inside).
        rows: output rows, indexed by ``pair.index``.
        device: torch device for model judges.
    """
    targets = [p for p in pairs if config.judge_all_rows or rows[p.index][S.REJECT_REASON] is None]
    if config.judge is None or not targets:
        return
    judge = load_backend("judges", config.judge, device)
    column = batch.get(config.category_column)
    policy = cached_policy(config.policy)

    def classify(some: list[PairImages]) -> list[tuple[Any, Any]]:
        categories = [column[p.index] if column else None for p in some]
        verdicts = judge.classify([p.original_image for p in some] + [p.edited_image for p in some],
                                  categories + categories, policy)
        if len(verdicts) != 2 * len(some):
            raise ValueError(f"the judge returned {len(verdicts)} verdicts for {2 * len(some)} images")
        return list(zip(verdicts[: len(some)], verdicts[len(some):]))

    for pair, (verdicts, error) in zip(targets, isolate(classify, targets)):
        row = rows[pair.index]
        row[S.JUDGE] = config.judge
        if error is not None:
            row.update({S.VALIDATE_STATUS: JUDGE_ERROR, S.REJECT_REASON: row[S.REJECT_REASON] or JUDGE_ERROR,
                        S.VALIDATE_ERROR: f"{_row_name(batch, pair.index)}: judge {config.judge} failed: {error}"})
            continue
        before, after = verdicts
        row.update({S.JUDGE_ORIGINAL: before.label, S.JUDGE_EDITED: after.label,
                    S.JUDGE_ORIGINAL_RAW: verdict_json(before), S.JUDGE_EDITED_RAW: verdict_json(after)})
        row[S.METRICS_RAN].append(f"judge:{config.judge}")
        row[S.LABEL_FLIP_CHECKED] = True
        if row[S.REJECT_REASON] is None:
            row[S.REJECT_REASON] = judge_reason(before.label, after.label)


def _row_name(batch: dict[str, list], index: int) -> str:
    """``row '<pair_id or source_id>'`` (candidate number added), or the row's place in the batch."""
    for key in (S.PAIR_ID, S.SOURCE_ID):
        if batch.get(key):
            candidate = batch.get(S.CANDIDATE)
            return f"row {batch[key][index]!r}" + (f" candidate {candidate[index]}" if candidate else "")
    return f"row {index} of its batch"
