"""Evaluate stage: run guards over the ``images`` config and score them (`scoring.score_predictions`)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from safetypairs import statuses as ST
from safetypairs.backends.base import as_verdict
from safetypairs.engine.datafiles import DataFiles, load_release
from safetypairs.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_max_pixels,
    load_image,
)
from safetypairs.evaluate.metrics import encode_labels
from safetypairs.evaluate.natural import NaturalSet, natural_comparison, select_natural, split_natural, with_natural
from safetypairs.policy import Policy, load_policy
from safetypairs.backends.registry import backend_class, check_ready, load_backend, unload_backends, usage_counts
from safetypairs.engine.runner import (
    Passes,
    RunConfig,
    RunSummary,
    content_fingerprint,
    for_rank,
    process_state,
    run_stage,
)
from safetypairs.schema import (
    CATEGORY,
    IMAGE,
    LABEL,
    LABELS,
    PAIR_ID,
    ROLE,
    UNKNOWN,
    role_names,
    with_columns,
)
from safetypairs.evaluate.scoring import (
    PREDICTION_FIELDS,
    guard_columns,
    guard_features,
    score_predictions,
)
from safetypairs.engine.stage import isolate, map_stage
from safetypairs.usage import Usage
from safetypairs.utils import device_for_rank

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = (IMAGE, LABEL, CATEGORY, PAIR_ID, ROLE)
GUARD_SECONDS = "guard_seconds"  # per-chunk guard seconds, summed by the runner next to the status counts
# chunk: every guard over a chunk, then the next chunk (all guards stay loaded); guard: one guard over the whole
# input, then it is unloaded and the next runs (peak memory = the largest guard); auto: see `guard_order`
ORDERS = ("chunk", "guard", "auto")


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate and how.

    Attributes:
        guards: guard specs (``hf-vlm:<id>``, ``llavaguard:<id>``, ``ocr-lexicon``, ...).
        policy: the policy the guards are prompted with (a built-in name or a YAML path).
        device: ``"auto"`` (one GPU per rank, else CPU) or a torch device string.
        batch_size: images per guard call.
        num_proc: `Dataset.map` processes (one per GPU); ``None`` for this process.
        n_bootstrap: bootstrap resamples over pairs for the CIs (0 turns them off).
        seed: bootstrap seed.
        max_pixels: images with more pixels are decoded reduced (JPEG) or get status ``too_large``.
        order: ``"chunk"``, ``"guard"`` or ``"auto"`` (see `ORDERS` and `guard_order`); it never changes a result.
    """

    guards: tuple[str, ...]
    policy: str | Policy = "llavaguard"
    device: str = "auto"
    batch_size: int = 8
    num_proc: int | None = None
    n_bootstrap: int = 1000
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    order: str = "auto"

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)
        if self.order not in ORDERS:
            raise ValueError(f"EvaluateConfig.order must be one of {', '.join(ORDERS)}; got {self.order!r}")
        if isinstance(self.guards, str) or not self.guards:
            raise ValueError("EvaluateConfig.guards must be a non-empty tuple of guard specs")
        object.__setattr__(self, "guards", tuple(dict.fromkeys(self.guards)))
        for spec in self.guards:
            check_ready("guards", spec)  # unknown alias ("did you mean"), bad options, user code that fails to import
        if self.batch_size < 1:
            raise ValueError(f"EvaluateConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"EvaluateConfig.num_proc must be >= 1 or None, got {self.num_proc}")
        if self.n_bootstrap < 0:
            raise ValueError(f"EvaluateConfig.n_bootstrap must be >= 0, got {self.n_bootstrap}")
        load_policy(self.policy)  # a bad policy fails before any model loads


@dataclass(frozen=True)
class GuardTransform:
    """Batched `Dataset.map` transform adding one guard's prediction columns.

    Holds only plain config so the map fingerprint (and the datasets cache) is stable; the guard
    is built lazily once per process and device.
    """

    guard: str
    policy: str
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        """Classify a batch; unreadable images get ``unknown`` with status ``unreadable`` (``too_large``
        over the pixel cap), images the guard raised on get ``unknown`` with status ``error`` (the
        others of the batch still run)."""
        cols = guard_columns(self.guard)
        n = len(batch[IMAGE])
        out: dict[str, list] = {cols[f]: [None] * n for f in PREDICTION_FIELDS}
        images, keep = [], []
        for i, cell in enumerate(batch[IMAGE]):
            try:
                images.append(load_image(cell, self.max_pixels))
                keep.append(i)
            except ImageError as err:
                out[cols["pred"]][i], out[cols["status"]][i] = UNKNOWN, err.status
                out[cols["rationale"]][i] = out[cols["raw"]][i] = (
                    f"image {batch[PAIR_ID][i]!r} ({batch[ROLE][i]}): {err}")
        if images:
            backend = load_backend("guards", self.guard, device_for_rank(self.device, rank))
            policy = load_policy(self.policy)
            items = [(images[j], batch[CATEGORY][i]) for j, i in enumerate(keep)]
            answers = isolate(lambda some: [as_verdict(v) for v in backend.classify(
                [im for im, _ in some], [c for _, c in some], policy)], items)  # plain labels from user guards too
            for i, (verdict, error) in zip(keep, answers):
                if error is not None:
                    out[cols["pred"]][i], out[cols["status"]][i] = UNKNOWN, ST.GUARD_ERROR
                    out[cols["rationale"]][i] = out[cols["raw"]][i] = (
                        f"image {batch[PAIR_ID][i]!r} ({role_names([batch[ROLE][i]])[0]}): guard {self.guard} "
                        f"failed: {error}")
                    continue
                out[cols["pred"]][i], out[cols["score"]][i] = verdict.label, verdict.score
                out[cols["rationale"]][i], out[cols["raw"]][i] = verdict.rationale, verdict.raw
                out[cols["status"]][i] = verdict.status or (ST.OK if verdict.label != UNKNOWN else ST.UNPARSABLE)
        return out


def check_images_dataset(dataset: Dataset) -> None:
    """Raise ValueError naming the missing columns of an ``images`` config."""
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks columns {missing}; an images config needs {', '.join(REQUIRED_COLUMNS)}")


def guard_order(config: EvaluateConfig) -> str:
    """The order an evaluation runs in: ``config.order``, or for ``"auto"`` guard-major (``"guard"``) when more than
    one guard holds a model in this process (served guards hold none) and the device is a GPU, where the sum of
    the guards may not fit; else chunk-major (``"chunk"``: no model is loaded twice, nothing to free)."""
    if config.order != "auto":
        return config.order
    import torch

    in_process = [s for s in config.guards if getattr(backend_class("guards", s), "IN_PROCESS", True)]
    gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    return "guard" if len(in_process) > 1 and gpu else "chunk"


def predict(dataset: Dataset, config: EvaluateConfig, guards: tuple[str, ...] | None = None
            ) -> tuple[Dataset, dict[str, dict[str, Any]]]:
    """Run guards over the images (one cached `Dataset.map` per guard); in guard order (`guard_order`) each guard
    is unloaded before the next loads.

    Args:
        dataset: an ``images`` config (image, label, category, pair_id, role).
        config: the evaluation config.
        guards: the guards to run (default: every guard of ``config``).

    Returns:
        ``(predictions, runs)``: the prediction columns of the guards (no images) and, per guard,
        ``{"statuses", "seconds"}`` and, for a served guard, its ``usage`` (`usage.Usage.as_dict`).

    Raises:
        ValueError: for a dataset without the ``images`` columns.
    """
    check_images_dataset(dataset)
    guards = config.guards if guards is None else guards
    unload = guard_order(config) == "guard" and len(guards) > 1
    current, runs = dataset, {}
    for spec in guards:
        start, before = time.perf_counter(), usage_counts().get(("guards", spec))
        current, result = map_stage(
            current, GuardTransform(spec, config.policy, config.device, config.max_pixels), stage=f"evaluate {spec}",
            features=with_columns(current.features, guard_features(spec)),
            status_column=guard_columns(spec)["status"], batch_size=config.batch_size, num_proc=config.num_proc,
        )
        runs[spec] = {"statuses": result.statuses, "seconds": round(time.perf_counter() - start, 3)}
        after = usage_counts().get(("guards", spec))
        if after is not None:
            runs[spec]["usage"] = (after - (before or Usage())).as_dict()
        if unload:
            unload_backends()
    keep = [c for spec in guards for c in guard_columns(spec).values()]
    return current.select_columns([LABEL, CATEGORY, PAIR_ID, ROLE, *keep]), runs


def run_evaluate(dataset: Dataset, config: EvaluateConfig, pairs: Dataset | None = None) -> dict[str, Any]:
    """Predict with every guard and score them.

    Args:
        dataset: an ``images`` config (see `load_release`).
        config: guards, policy, device, batch size, bootstrap settings.
        pairs: the ``pairs`` config (optional), for similarity correlations.

    Returns:
        The results dict of `score_predictions`, plus ``"dataset": {"fingerprint", "n_rows"}``.

    Raises:
        ValueError: for a dataset without the ``images`` columns.
    """
    preds, runs = predict(dataset, config)
    results = score_predictions(preds, config, pairs=pairs, runs=runs)
    results["dataset"] = {"fingerprint": content_fingerprint(dataset), "n_rows": len(dataset)}
    return results


def evaluate_run(path: str, config: EvaluateConfig, run: RunConfig, split: str | None = None,
                     natural: Dataset | None = None) -> dict[str, Any]:
    """Evaluate guards on a released benchmark, on the shared runner (sharded over ranks, resumable).

    Writes ``results.json``, ``predictions.parquet`` (with raw answers), ``report.html`` and
    ``run.json`` into ``run.out``; the folder appears whole when the run finishes. Under
    ``accelerate launch`` / ``torchrun`` the ranks share the chunks (the natural images' too: they follow the
    release's images in the run's input) and rank 0 scores and writes. A finished folder with the same settings and
    data is reused.

    Args:
        path: a release folder or ``ORG/NAME`` (its ``images`` config; ``pairs`` when present).
        config: the evaluation config.
        run: the output folder, chunk size and overwrite policy.
        split: the split to use (default: test, else train).
        natural: labelled natural images (see `natural_images`); those inside the policy that share no image and
            no source with the release (`natural.select_natural`) are compared with the pairs: adds
            ``results["natural"]`` (`natural_comparison`) and ``results["natural_set"]`` (what was left out, why).
            The guards' statuses in the results count the release's images; their seconds and usage, the run's.

    Returns:
        The results dict (as written to ``results.json``); ``{}`` on ranks other than 0.

    Raises:
        ValueError: when ``path`` is not a release (no ``images`` config).
        OutputDirError: when ``run.out`` is the input, contains it or lies inside it.
    """
    from safetypairs.evaluate.report import release_outcomes, render_report

    run = run.reading(path)  # checked before anything is read
    state = process_state(config.device)
    with state.main_process_first():
        images = load_release(path, "images", split or "auto")
        pairs = load_release(path, "pairs", split or "auto") if images is not None else None
        rejected = load_release(path, "rejected", "auto") if images is not None else None
    if images is None:
        raise ValueError(f"{path} is not a SafetyPairs release (no 'images' config); make one with "
                         "`safetypairs release <validated folder> --out <release folder>`")
    used = split or (str(images.split) if images.split is not None else None)
    chosen = _natural_set(natural, images, config) if natural is not None else None
    order = guard_order(config)
    results: dict[str, Any] = {}

    def compute(rows: Dataset, device: str, *guards: str) -> tuple[Dataset, dict[str, dict[str, Any]]]:
        preds, runs = predict(rows, for_rank(config, device), guards or None)  # checked once, not per chunk
        counts: dict[str, dict[str, Any]] = {spec: run["statuses"] for spec, run in runs.items()}
        counts[GUARD_SECONDS] = {spec: run["seconds"] for spec, run in runs.items()}
        return preds, counts

    def finalize(work: Path, files: DataFiles, summary: RunSummary) -> dict[str, Any]:
        preds = files.rows()
        if chosen is not None:
            preds, natural_preds = split_natural(preds, images)
        runs = {spec: {"statuses": _statuses(preds, spec) if chosen is not None else summary.statuses.get(spec, {}),
                       "seconds": summary.statuses.get(GUARD_SECONDS, {}).get(spec)} for spec in config.guards}
        for spec, usage in summary.usage.get("guards", {}).items():
            runs[spec]["usage"] = usage
        results.update(score_predictions(preds, config, pairs=pairs, runs=runs))
        results["dataset"] = {"path": str(path), "split": used, "fingerprint": summary.fingerprint, "n_rows": len(images)}
        results["release"] = release_outcomes(len(pairs) if pairs is not None else 0, rejected)
        if chosen is not None:
            results["natural_set"] = chosen.account
            results["natural"] = natural_comparison(preds, natural_preds, _pred_columns(config),
                                                    n_bootstrap=config.n_bootstrap, seed=config.seed)
        preds.to_parquet(str(work / "predictions.parquet"))
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        render_report(results, work / "report.html", pairs=pairs)
        return {"results": "results.json", "report": "report.html", "guard_order": order}

    # the natural rows' content is in the input's fingerprint; the setting says there are some
    settings = {**evaluate_settings(config), "dataset": str(path), "split": used,
                "natural": len(chosen.rows) if chosen is not None else None}
    passes = Passes(config.guards, compute, lambda spec: unload_backends())
    rows = with_natural(images, chosen.rows) if chosen is not None else images
    summary = run_stage(rows, passes if order == "guard" and len(config.guards) > 1 else compute,
                        stage="evaluate", settings=settings, run=run, device=config.device, finalize=finalize,
                        max_pixels=config.max_pixels, usage=usage_counts)
    if summary is None:  # not rank 0: rank 0 scores and writes
        return {}
    if not results:  # a finished folder with the same settings and data was reused
        results.update(json.loads((Path(run.out) / "results.json").read_text(encoding="utf-8")))
    logger.info("wrote %s", Path(run.out) / "report.html")
    return results


def _statuses(preds: Dataset, spec: str) -> dict[str, int]:
    """A guard's status histogram over ``preds`` (most frequent first)."""
    return dict(Counter(preds[guard_columns(spec)["status"]]).most_common())


def _natural_set(natural: Dataset, images: Dataset, config: EvaluateConfig) -> NaturalSet:
    """The natural rows to compare (`natural.select_natural`), checked before any guard runs.

    Raises:
        ValueError: when no natural image of either class is left.
    """
    chosen = select_natural(natural, images, load_policy(config.policy), config.max_pixels)
    labels = {LABELS[v] for v in encode_labels(chosen.rows[LABEL], "natural labels", allow_unknown=False)}
    if len(labels) < 2:
        have = "no natural image" if not labels else f"natural images of one class only ({labels.pop()})"
        raise ValueError(f"--natural: {have} left to compare: {chosen.account['sentence']}; give labelled safe and "
                         "unsafe images that are not release images, in the policy's categories")
    logger.info("natural images: %s", chosen.account["sentence"])
    return chosen


def evaluate_settings(config: EvaluateConfig) -> dict[str, Any]:
    """The settings that decide an evaluation's output (batching, processes and guard order left out)."""
    return {k: v for k, v in asdict(config).items() if k not in ("batch_size", "num_proc", "order")}


def _pred_columns(config: EvaluateConfig) -> dict[str, str]:
    return {spec: guard_columns(spec)["pred"] for spec in config.guards}
