"""Model-backed validation: the VAE round-trip reference, LPIPS inside/outside the mask, CLIP with the edit blanked, judge flip."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from safetypairs import schema as S
from safetypairs.change import (
    ChangeMask,
    blank_region,
    composite,
    feather,
    masked_mean,
    resize_mask,
)
from safetypairs.policy import cached_policy
from safetypairs.registry import backend_class, load_backend
from safetypairs.stage import isolate

logger = logging.getLogger(__name__)

JUDGE_ERROR = "judge_error"  # validate_status of a row the judge raised on

_UNAVAILABLE: dict[tuple[str, str], str] = {}


REFERENCES = ("original", "control", "vae_roundtrip")  # what an edit is compared with (`validate_reference`)


@dataclass
class PairImages:
    """One readable row of a validation batch: float arrays at working resolution, PIL images at full size.

    ``reference`` is what the edit is compared with: the original, the artifact control (same editor
    and seed, no-op instruction) or the original's round trip through the editor's VAE.
    """

    index: int
    original: np.ndarray
    edited: np.ndarray
    full_size: tuple[int, int]
    original_image: Image.Image
    edited_image: Image.Image
    mask: ChangeMask | None = None
    control_image: Image.Image | None = None
    reference_image: Image.Image | None = None
    reference: np.ndarray | None = None
    reference_kind: str = "original"


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
    """Fill ``lpips_outside/inside`` and ``clip_outside`` for measured pairs (in place), edit vs reference.

    Args:
        config: which encoders to run.
        pairs: readable pairs with their change masks.
        rows: output rows, indexed by ``pair.index``.
        device: torch device for the encoders.
    """
    lpips_enc = load_encoder(config.lpips, device) if config.lpips and pairs else None
    if lpips_enc is not None:
        fits = [p for p in pairs if min(p.original.shape[:2]) >= lpips_enc.min_side]
        maps = lpips_enc.distance_maps([p.reference for p in fits], [p.edited for p in fits])
        for pair, dist in zip(fits, maps):
            row = rows[pair.index]
            row[S.LPIPS_OUTSIDE] = masked_mean(dist, ~pair.mask.region)
            row[S.LPIPS_INSIDE] = masked_mean(dist, pair.mask.changed)
            row[S.METRICS_RAN].append(lpips_enc.name)
    clip_enc = load_encoder(config.clip, device) if config.clip and pairs else None
    if clip_enc is not None:
        blanked = [blank_region(p.reference, p.mask.region) for p in pairs]
        blanked += [blank_region(p.edited, p.mask.region) for p in pairs]
        emb = clip_enc.embed(blanked)
        cosine = np.sum(emb[: len(pairs)] * emb[len(pairs):], axis=1)
        for pair, cos in zip(pairs, cosine):
            rows[pair.index][S.CLIP_OUTSIDE] = float(cos)
            rows[pair.index][S.METRICS_RAN].append(clip_enc.name)


def _load_roundtrip(spec: str, device: str) -> Any | None:
    """The VAE round trip of editor ``spec`` (its ``roundtrip_reference`` capability), or ``None``
    when the editor has none or it cannot load (one warning per process and spec)."""
    key = (spec, device)
    if key in _UNAVAILABLE:
        return None
    try:
        loader = getattr(backend_class("editors", spec), "roundtrip_reference", None)
        if loader is None:
            _UNAVAILABLE[key] = "no VAE round trip"
            return None
        return _roundtrip_cache(loader, spec, device)
    except Exception as err:  # unknown third-party editor, weights missing, ...: measure against the original
        _UNAVAILABLE[key] = f"{type(err).__name__}: {err}"
        logger.warning("no VAE round trip for %s on %s (%s); measuring against the original", spec, device,
                       _UNAVAILABLE[key])
        return None


@functools.lru_cache(maxsize=4)
def _roundtrip_cache(loader: Any, spec: str, device: str) -> Any:
    return loader(spec.partition(":")[2] or None, device)


def vae_references(pairs: list[PairImages], editors: list[str | None], work_sizes: list[Any], device: str) -> None:
    """Give every pair without a reference the VAE round trip of its original, when its editor has one.

    Args:
        pairs: readable pairs; those without a ``reference_image`` (no control) are considered.
        editors: the ``editor`` spec of each pair (same order).
        work_sizes: the ``edit_work_size`` the editor ran at per pair (``None`` when unknown).
        device: torch device for the VAE.
    """
    groups: dict[str, list[int]] = {}
    for k, (pair, editor) in enumerate(zip(pairs, editors)):
        if pair.reference_image is None and editor:
            groups.setdefault(editor, []).append(k)
    for editor, members in groups.items():
        roundtrip = _load_roundtrip(editor, device)
        if roundtrip is None:
            continue
        images = roundtrip([pairs[k].original_image for k in members], [work_sizes[k] for k in members])
        for k, image in zip(members, images):
            pairs[k].reference_image = image
            pairs[k].reference_kind = "vae_roundtrip"


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
                        S.VALIDATE_ERROR: f"{row_name(batch, pair.index)}: judge {config.judge} failed: {error}"})
            continue
        before, after = verdicts
        row.update({S.JUDGE_ORIGINAL: before.label, S.JUDGE_EDITED: after.label,
                    S.JUDGE_ORIGINAL_RAW: verdict_json(before), S.JUDGE_EDITED_RAW: verdict_json(after)})
        row[S.METRICS_RAN].append(f"judge:{config.judge}")
        row[S.LABEL_FLIP_CHECKED] = True
        if row[S.REJECT_REASON] is None:
            row[S.REJECT_REASON] = judge_reason(before.label, after.label)


def row_name(batch: dict[str, list], i: int) -> str:
    """How an error names a row: ``row '<source_id or pair_id>' (candidate N)``, else its place in the batch."""
    for column in (S.SOURCE_ID, S.PAIR_ID):
        if batch.get(column) and batch[column][i] is not None:
            candidate = batch.get(S.CANDIDATE, [None] * (i + 1))[i]
            return f"row {batch[column][i]!r}" + (f" (candidate {candidate})" if candidate is not None else "")
    return f"row #{i} of its batch"


def composite_columns(config: Any, batch: dict[str, list], pairs: list[PairImages],
                      rows: list[dict[str, Any]]) -> dict[str, list]:
    """The edited (and control) columns with every measured pair composited onto its original.

    Inside the feathered, dilated change mask the edit (control) is kept, outside it the original,
    bit for bit; rows that were not measured keep their cells. ``metrics_ran`` gains ``composite``.

    Args:
        config: column names and ``feather_px``.
        batch: the input batch (cells of rows that are not composited are returned as they are).
        pairs: the measured pairs, with their masks.
        rows: output rows, indexed by ``pair.index`` (``metrics_ran`` is appended to).

    Returns:
        ``{edited_column: [...], control_column: [...]}`` (the control only when the batch has it).
    """
    out = {config.edited_column: list(batch[config.edited_column])}
    has_control = config.control_column in batch
    if has_control:
        out[config.control_column] = list(batch[config.control_column])
    for pair in pairs:
        alpha = feather(resize_mask(pair.mask.region, pair.full_size), config.feather_px)
        out[config.edited_column][pair.index] = composite(pair.original_image, pair.edited_image, alpha)
        if has_control and pair.control_image is not None:
            out[config.control_column][pair.index] = composite(pair.original_image, pair.control_image, alpha)
        rows[pair.index][S.METRICS_RAN].append("composite")
    return out
