"""Scoring guard predictions: each guard's prediction columns, metrics per guard, the leaderboard."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from datasets import Dataset, Features, Value

from safetypairs.evaluate.caveats import release_caveats
from safetypairs.evaluate.metrics import compute_metrics
from safetypairs.policy import Policy, load_policy
from safetypairs.schema import (
    CATEGORY,
    CHANGED_FRACTION,
    LABEL,
    LABELS,
    LPIPS_OUTSIDE,
    PAIR_ID,
    ROLE,
    role_names,
)

SIMILARITY_COLUMNS = (CHANGED_FRACTION, LPIPS_OUTSIDE)
# Row statuses of a guard's prediction (besides "ok"); the detail goes in the rationale and raw columns.
PREDICTION_FIELDS = ("pred", "score", "rationale", "raw", "status")
NO_ANSWER = "answered no image"  # a guard whose every prediction failed: its metrics measure nothing


def guard_columns(spec: str) -> dict[str, str]:
    """Column names of one guard's predictions: ``{"pred": ..., "score": ..., ...}``.

    A readable slug of the spec plus a short hash keeps names distinct and stable.
    """
    slug = re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")[:40]
    digest = hashlib.sha1(spec.encode()).hexdigest()[:6]
    return {field: f"guard_{slug}_{digest}_{field}" for field in PREDICTION_FIELDS}


def guard_features(spec: str) -> Features:
    """`datasets.Features` of one guard's prediction columns."""
    cols = guard_columns(spec)
    types = {"pred": "string", "score": "float32", "rationale": "string", "raw": "string", "status": "string"}
    return Features({cols[f]: Value(types[f]) for f in PREDICTION_FIELDS})


def _similarity(pairs: Dataset | None, pair_ids: Sequence[str]) -> dict[str, list[float | None]]:
    """Per-image similarity columns joined from the ``pairs`` config by ``pair_id``."""
    if pairs is None:
        return {}
    names = [c for c in SIMILARITY_COLUMNS if c in pairs.column_names]
    table = pairs.select_columns([PAIR_ID, *names]).to_dict()
    by_id = {pid: i for i, pid in enumerate(table[PAIR_ID])}
    return {name: [table[name][by_id[p]] if p in by_id else None for p in pair_ids] for name in names}


def _labels(values: Sequence[Any]) -> list[str]:
    return [LABELS[v] if isinstance(v, int) else str(v) for v in values]


class ScoringSettings(Protocol):
    """What scoring reads from a config: `EvaluateConfig`, or `score.ScoreConfig` for a predictions file."""

    guards: tuple[str, ...]
    policy: str | Policy
    n_bootstrap: int
    seed: int


def score_predictions(
    predictions: Dataset | Mapping[str, Sequence[Any]],
    config: ScoringSettings,
    pairs: Dataset | None = None,
    runs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics per guard, a leaderboard and the per-image predictions (JSON-ready).

    Args:
        predictions: the output of `predict` (or its ``to_dict()``).
        config: the evaluation config (guards, bootstrap settings; a dataclass).
        pairs: the ``pairs`` config, for the correlation of errors with pair similarity and the caveats.
        runs: per-guard run info from `predict` (statuses, seconds).

    Returns:
        ``{"config", "policy", "n_images", "guards": {spec: {"metrics", "statuses", "seconds", "warnings"}},
        "leaderboard": [...], "images": {pair_id, role, label, category},
        "predictions": {spec: {pred, score, rationale}}, "notes": {spec: circularity warning},
        "warnings": [release caveats, e.g. no judge checked the label flip]}`` (see `caveats`).
    """
    table = predictions.to_dict() if isinstance(predictions, Dataset) else dict(predictions)
    labels = _labels(table[LABEL])
    roles = role_names(table[ROLE])
    similarity = _similarity(pairs, table[PAIR_ID])
    notes, warnings = release_caveats(pairs, config.guards)
    results: dict[str, Any] = {
        "config": asdict(config), "policy": load_policy(config.policy).id, "n_images": len(labels),
        "guards": {}, "leaderboard": [], "predictions": {}, "notes": notes, "warnings": warnings,
        "images": {PAIR_ID: table[PAIR_ID], ROLE: roles, LABEL: labels, CATEGORY: table[CATEGORY]},
    }
    for spec in config.guards:
        cols = guard_columns(spec)
        metrics = compute_metrics(
            table[cols["pred"]], labels, table[PAIR_ID], categories=table[CATEGORY], scores=table[cols["score"]],
            roles=roles, similarity=similarity, n_bootstrap=config.n_bootstrap, seed=config.seed,
        )
        results["guards"][spec] = {"metrics": metrics, **(runs or {}).get(spec, {}),
                                   "warnings": [notes[spec]] if spec in notes else []}
        if labels and not any(pred in LABELS for pred in table[cols["pred"]]):  # scored: each image an error
            results["guards"][spec]["warnings"].append(
                _no_answer(table.get(cols["status"]) or table[cols["pred"]], table.get(cols["rationale"]) or []))
        results["predictions"][spec] = {f: table[cols[f]] for f in ("pred", "score", "rationale")}
    results["leaderboard"] = leaderboard(results["guards"])
    return results


def _no_answer(statuses: Sequence[str | None], rationales: Sequence[str | None]) -> str:
    """The warning for a guard that answered no image: its statuses (or predictions) and the first recorded reason."""
    first = next((r for r in rationales if r), "none recorded")
    return f"{NO_ANSWER}: {dict(Counter(statuses).most_common())}; the first: {first}"


def unanswered(results: Mapping[str, Any]) -> dict[str, str]:
    """Guard -> its `NO_ANSWER` warning, for the guards of `score_predictions` results that answered no image."""
    return {spec: warning for spec, guard in results["guards"].items()
            for warning in guard.get("warnings", []) if warning.startswith(NO_ANSWER)}


def leaderboard(guards: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Guards ranked by pair accuracy, then F1 (undefined values last)."""
    keys = ("pair_accuracy", "f1", "balanced_accuracy", "auroc", "same_label_rate", "flip_detection_rate", "n_unknown")
    rows = [{"guard": spec, **{k: g["metrics"].get(k) for k in keys}} for spec, g in guards.items()]

    def rank(value: float | None) -> tuple[bool, float]:
        return value is None, -(value or 0.0)  # undefined after every defined value, 0.0 included

    return sorted(rows, key=lambda r: (rank(r["pair_accuracy"]), rank(r["f1"])))
