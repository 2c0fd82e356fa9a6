"""Pair validation: prove each edit is local (change mask, preservation outside it), real and label-flipping."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from datasets import Dataset
from PIL import Image

from safetypairs import schema as S
from safetypairs.backends.encoders import lpips_arguments
from safetypairs.change import (
    MaskParams,
    bbox,
    change_mask,
    masked_mean,
    psnr_where,
    ssim_map,
    to_float,
)
from safetypairs.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_max_pixels,
    load_image,
)
from safetypairs.policy import Policy, load_policy
from safetypairs.registry import parse_spec
from safetypairs.runner import RunConfig, RunSummary, run_stage
from safetypairs.stage import StageResult, map_stage
from safetypairs.utils import device_for_rank, status_histogram
from safetypairs.validate_models import (
    JUDGE_ERROR,
    PairImages,
    encoder_metrics,
    judge_rows,
)

logger = logging.getLogger(__name__)

# Every value `validate_status` and `reject_reason` can take (reject_reason is None when accepted).
STATUS_OK = "ok"  # measured and decided: see `accepted` / `reject_reason`
ROW_FAILURES = {
    "edit_failed": "the edit stage failed for this row or left no edited image",
    "unreadable": "an image cell could not be decoded (detail in validate_error; the cell is stored as null)",
    "too_large": "an image has more pixels than max_pixels and cannot be decoded reduced (the cell is stored as null)",
    "unknown_category": "the category is null, blank or not one of the policy's categories",
    "size_mismatch": "the two images differ in size and size_mismatch='reject'",
    "too_small": "an image side is below min_side (smaller than the LPIPS receptive field)",
    JUDGE_ERROR: "the judge raised on this row (detail in validate_error); its pixel metrics are kept",
}
REJECT_REASONS = {
    **ROW_FAILURES,
    "no_change": "changed_fraction below min_changed_fraction: nothing real changed",
    "not_local": "changed_fraction above max_changed_fraction: the change covers too much of the image",
    "background_changed": "SSIM/PSNR (or LPIPS/CLIP, when thresholds are set) outside the dilated mask too far off",
    "judge_unknown": "the judge could not label one of the images",
    "original_not_unsafe": "the judge does not call the original unsafe",
    "still_unsafe": "the judge still calls the edited image unsafe",
}
SIZE_POLICIES = ("reject", "resize")
CLIP_ALIASES = ("open_clip", "hf-clip")


@dataclass(frozen=True)
class ValidateConfig:
    """Settings of the validation stage; every value is checked up front.

    Thresholds come from the calibration table (``python -m benchmarks.calibration``, also printed
    by tests/test_validate.py): 4 local edits and 7 global changes on 5 real ``skimage.data``
    photos. Each sits in the measured gap between the worst accepted local edit and the global
    changes that only that check rejects:

    - ``mask_delta_e=8``: with 6, JPEG-q90 noise alone touches up to 44% of grid cells; with 8, 14%.
    - ``max_change_spread=0.5``: local edits 0.06..0.14; shift/JPEG-q10/crop/recolour >= 0.66.
    - ``min_psnr_outside=32.5``: local edits >= 34.2 dB (paste + JPEG q90); brightness and
      contrast changes that stay under the ΔE threshold reach at most 31.0 dB.
    - ``min_ssim_outside=0.91``: local edits >= 0.933; blur <= 0.898.
    - ``min_changed_fraction=0.002``: smallest local edit 0.0069, identical 0.
    - ``max_changed_fraction=0.35``: a policy cap (an edit over a third of the frame is not
      targeted); no calibration case depends on it.

    Attributes:
        original_column: the unsafe original (``image`` for candidates, ``unsafe_image`` for pairs).
        edited_column: the edit (``edited_image`` for candidates, ``safe_image`` for pairs).
        category_column: policy category passed to the judge (``None`` when the column is absent).
        edit_status_column: rows whose value here is not ``"ok"`` are ``edit_failed`` (ignored if absent).
        policy: built-in policy name or YAML path, for the judge.
        judge: ``judges`` spec (e.g. ``"ocr-lexicon"``), or ``None`` for no label-flip check.
        judge_all_rows: also judge rows the pixel checks already rejected (costs judge time).
        lpips: ``lpips:<alex|vgg|squeeze>`` spec or ``None``. An encoder that cannot load (e.g. no
            network for its weights) is skipped with a warning; ``metrics_ran`` says what ran.
        clip: ``open_clip:<arch>/<pretrained>`` or ``hf-clip:<id or path>`` spec, or ``None``.
        device: ``"auto"`` (GPU of the map rank when available) or a torch device.
        size_mismatch: ``"reject"`` (status ``size_mismatch``) or ``"resize"`` the edit to the
            original's size with LANCZOS and set ``validate_resized``.
        max_side: images with a longer side are measured at this size (mask stored full size).
        min_side: images with a shorter side are ``too_small`` (32 = AlexNet-LPIPS' minimum).
        mask_delta_e: CIE76 ΔE in CIELAB above which a pixel counts as changed.
        mask_open_px / mask_close_px: radii of the opening (drops speckle) and closing (fills holes).
        mask_min_region: connected changes smaller than this share of the image are dropped.
        dilate_fraction / dilate_min_px: margin around the change excluded from "outside" metrics
            (5 px covers the 7x7 SSIM window around a changed pixel, diagonal included).
        min_changed_fraction / max_changed_fraction: the change must cover a share in this range.
        min_ssim_outside / min_psnr_outside: preservation needed outside the dilated mask.
        max_lpips_outside / min_clip_outside: optional thresholds (``None`` = recorded, not used:
            they cannot be calibrated without the real weights, which this project's CI lacks).
        batch_size / num_proc: `Dataset.map` settings.
        max_pixels: images with more pixels are decoded reduced (JPEG) or are ``too_large``.
    """

    original_column: str = S.IMAGE
    edited_column: str = S.EDITED_IMAGE
    category_column: str = S.CATEGORY
    edit_status_column: str = S.EDIT_STATUS
    policy: str = "llavaguard"
    judge: str | None = None
    judge_all_rows: bool = False
    lpips: str | None = None
    clip: str | None = None
    device: str = "auto"
    size_mismatch: str = "reject"
    max_side: int = 1024
    min_side: int = 32
    mask_delta_e: float = 8.0
    mask_open_px: int = 1
    mask_close_px: int = 3
    mask_min_region: float = 0.0005
    dilate_fraction: float = 0.02
    dilate_min_px: int = 5
    spread_grid: int = 8
    spread_cell_min: float = 0.01
    min_changed_fraction: float = 0.002
    max_changed_fraction: float = 0.35
    max_change_spread: float = 0.5
    min_ssim_outside: float = 0.91
    min_psnr_outside: float = 32.5
    max_lpips_outside: float | None = None
    min_clip_outside: float | None = None
    batch_size: int = 8
    num_proc: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)
        if self.size_mismatch not in SIZE_POLICIES:
            raise ValueError(f"size_mismatch must be one of {SIZE_POLICIES}, got {self.size_mismatch!r}")
        if self.original_column == self.edited_column:
            raise ValueError("original_column and edited_column must differ")
        if self.judge is not None:
            parse_spec("judges", self.judge)
        if self.lpips is not None:
            spec = parse_spec("encoders", self.lpips)
            if spec.alias != "lpips":
                raise ValueError(f"lpips must be an 'lpips:<alex|vgg|squeeze>' spec, got {self.lpips!r}")
            lpips_arguments(spec.arg)
        if self.clip is not None and parse_spec("encoders", self.clip).alias not in CLIP_ALIASES:
            raise ValueError(f"clip must be an {' or '.join(CLIP_ALIASES)} spec, got {self.clip!r}")
        _check_ranges(self)
        load_policy(self.policy)

    @property
    def mask_params(self) -> MaskParams:
        """The change-mask settings."""
        return MaskParams(self.mask_delta_e, self.mask_open_px, self.mask_close_px, self.mask_min_region,
                          self.dilate_fraction, self.dilate_min_px)


def _check_ranges(c: ValidateConfig) -> None:
    checks = {
        "max_side": c.max_side >= c.min_side >= 8, "min_side": c.min_side >= 8,
        "mask_delta_e": c.mask_delta_e > 0, "mask_open_px": c.mask_open_px >= 0, "mask_close_px": c.mask_close_px >= 0,
        "mask_min_region": 0 <= c.mask_min_region < 1, "dilate_fraction": 0 <= c.dilate_fraction < 0.5,
        "dilate_min_px": c.dilate_min_px >= 0, "spread_grid": c.spread_grid >= 1,
        "spread_cell_min": 0 <= c.spread_cell_min < 1, "max_change_spread": 0 < c.max_change_spread <= 1,
        "min_changed_fraction": 0 <= c.min_changed_fraction < c.max_changed_fraction <= 1,
        "max_changed_fraction": 0 < c.max_changed_fraction <= 1, "min_ssim_outside": -1 <= c.min_ssim_outside <= 1,
        "min_psnr_outside": c.min_psnr_outside >= 0, "batch_size": c.batch_size >= 1,
        "max_lpips_outside": c.max_lpips_outside is None or c.max_lpips_outside >= 0,
        "min_clip_outside": c.min_clip_outside is None or -1 <= c.min_clip_outside <= 1,
        "num_proc": c.num_proc is None or c.num_proc >= 1,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"invalid ValidateConfig value(s) for {', '.join(bad)}: {[getattr(c, b) for b in bad]}")


def _empty_row() -> dict[str, Any]:
    row = {name: None for name in S.VALIDATION_FEATURES}
    row.update({S.METRICS_RAN: [], S.ACCEPTED: False, S.CHANGE_BBOX: [], S.VALIDATE_RESIZED: False})
    return row


class ValidateTransform:
    """Batched, picklable `Dataset.map` transform; holds only the config, loads models lazily."""

    def __init__(self, config: ValidateConfig) -> None:
        self.config = config

    @functools.cached_property
    def policy(self) -> Policy:
        """The policy categories are checked against (loaded once per process)."""
        return load_policy(self.config.policy)

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        """Measure and decide every row of ``batch``.

        Args:
            batch: columns of the batch (original and edited image columns required).
            rank: the `Dataset.map` process rank (picks the GPU).

        Returns:
            The validation columns (`schema.VALIDATION_FEATURES`), one value per row, and the two
            image columns with the cells that could not be decoded set to null.
        """
        c = self.config
        n = len(batch[c.original_column])
        rows = [_empty_row() for _ in range(n)]
        images = {c.original_column: list(batch[c.original_column]), c.edited_column: list(batch[c.edited_column])}
        pairs = [p for i in range(n) if (p := self._prepare(batch, i, rows[i], images)) is not None]
        device = device_for_rank(c.device, rank)
        for pair in pairs:
            self._pixel_metrics(pair, rows[pair.index])
        encoder_metrics(c, pairs, rows, device)
        for pair in pairs:
            rows[pair.index][S.REJECT_REASON] = decide_pixels(c, rows[pair.index])
        judge_rows(c, batch, pairs, rows, device)
        for row in rows:
            row[S.ACCEPTED] = row[S.VALIDATE_STATUS] == STATUS_OK and row[S.REJECT_REASON] is None
        return {**images, **{name: [row[name] for row in rows] for name in S.VALIDATION_FEATURES}}

    def _prepare(self, batch: dict[str, list], i: int, row: dict[str, Any],
                 images: dict[str, list]) -> PairImages | None:
        """Read and size-check one row; on failure fill its status and return ``None``.

        A cell that cannot be decoded is set to null in ``images`` (its bytes are not carried on).
        """
        c = self.config
        name = _row_name(batch, i)
        status = batch.get(c.edit_status_column, [None] * (i + 1))[i]
        if status is not None and status != S.OK:
            error = batch.get(S.EDIT_ERROR, [None] * (i + 1))[i]
            return _fail(row, "edit_failed", error or f"row {name}: {c.edit_status_column}={status}")
        if batch[c.edited_column][i] is None:
            return _fail(row, "edit_failed", f"row {name}: no edited image")
        category = batch[c.category_column][i] if c.category_column in batch else None
        if c.category_column in batch and category not in self.policy.categories:
            return _fail(row, "unknown_category", f"row {name}: category {category!r} is not in policy "
                                                  f"{self.policy.id} (allowed: {', '.join(self.policy.categories)})")
        decoded = []
        for column in (c.original_column, c.edited_column):
            try:
                decoded.append(load_image(batch[column][i], c.max_pixels))
            except ImageError as err:
                images[column][i] = None
                return _fail(row, err.status, f"row {name}: {column}: {err}")
        original, edited = decoded
        if original.size != edited.size:
            if c.size_mismatch == "reject":
                return _fail(row, "size_mismatch", f"row {name}: original {original.size} vs edited {edited.size}")
            edited = edited.resize(original.size, Image.Resampling.LANCZOS)
            row[S.VALIDATE_RESIZED] = True
        if min(original.size) < c.min_side:
            return _fail(row, "too_small", f"row {name}: size {original.size} below min_side={c.min_side}")
        row[S.VALIDATE_STATUS] = STATUS_OK
        work_a, work_b = original, edited
        scale = c.max_side / max(original.size)
        if scale < 1.0:
            work = (max(1, round(original.width * scale)), max(1, round(original.height * scale)))
            work_a, work_b = (im.resize(work, Image.Resampling.BOX) for im in (original, edited))
        return PairImages(i, to_float(work_a), to_float(work_b), original.size, original, edited)

    def _pixel_metrics(self, pair: PairImages, row: dict[str, Any]) -> None:
        mask = change_mask(pair.original, pair.edited, self.config.mask_params)
        pair.mask = mask
        outside = ~mask.region
        full = _full_size_mask(mask.changed, pair.full_size)
        row[S.EDIT_MASK] = Image.fromarray(full.astype(np.uint8) * 255)  # 2-D uint8: mode "L"
        row[S.CHANGED_FRACTION] = mask.changed_fraction
        row[S.CHANGE_BBOX] = bbox(full)
        row[S.CHANGE_SPREAD] = mask.spread(self.config.spread_grid, self.config.spread_cell_min)
        row[S.COLOR_CHANGE_INSIDE] = masked_mean(mask.delta_e, mask.changed)
        row[S.SSIM_OUTSIDE] = masked_mean(ssim_map(pair.original, pair.edited), outside)
        row[S.PSNR_OUTSIDE] = psnr_where(pair.original, pair.edited, outside)
        row[S.METRICS_RAN] += ["change_mask", "ssim", "psnr"]


def _row_name(batch: dict[str, list], i: int) -> str:
    """How an error names a row: its source id (and candidate) or pair id, else its place in the batch."""
    for column in (S.SOURCE_ID, S.PAIR_ID):
        if batch.get(column) and batch[column][i] is not None:
            candidate = batch.get(S.CANDIDATE, [None] * (i + 1))[i]
            return repr(batch[column][i]) + (f" (candidate {candidate})" if candidate is not None else "")
    return f"#{i} of its batch"


def _fail(row: dict[str, Any], status: str, error: str) -> None:
    row.update({S.VALIDATE_STATUS: status, S.REJECT_REASON: status, S.VALIDATE_ERROR: error})
    return None


def _full_size_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == tuple(size):
        return mask
    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


def decide_pixels(config: ValidateConfig, row: dict[str, Any]) -> str | None:
    """The reject reason from the measured metrics alone (``None`` when the pixels pass).

    Order: ``not_local`` (change too large or too spread out), ``background_changed`` (outside
    metrics below threshold, also when the mask is empty: a global change under the ΔE
    threshold), then ``no_change``.

    Args:
        config: thresholds.
        row: a row with the metric columns filled.

    Returns:
        ``not_local``, ``background_changed``, ``no_change`` or ``None``.
    """
    if row[S.CHANGED_FRACTION] > config.max_changed_fraction or row[S.CHANGE_SPREAD] > config.max_change_spread:
        return "not_local"
    failed = [
        _below(row[S.SSIM_OUTSIDE], config.min_ssim_outside),
        _below(row[S.PSNR_OUTSIDE], config.min_psnr_outside),
        _below(row[S.CLIP_OUTSIDE], config.min_clip_outside),
        config.max_lpips_outside is not None and row[S.LPIPS_OUTSIDE] is not None
        and row[S.LPIPS_OUTSIDE] > config.max_lpips_outside,
    ]
    if any(failed):
        return "background_changed"
    return "no_change" if row[S.CHANGED_FRACTION] < config.min_changed_fraction else None


def _below(value: float | None, threshold: float | None) -> bool:
    return threshold is not None and value is not None and (math.isnan(value) or value < threshold)


def run_validate(dataset: Dataset, config: ValidateConfig | None = None) -> tuple[Dataset, StageResult]:
    """Run validation over a dataset of candidates or pairs.

    Args:
        dataset: rows with ``config.original_column`` and ``config.edited_column``.
        config: the stage settings (defaults when ``None``).

    Returns:
        The dataset with `schema.VALIDATION_FEATURES` added, and the `StageResult`.

    Raises:
        ValueError: when an image column is missing.
    """
    config = config or ValidateConfig()
    missing = [c for c in (config.original_column, config.edited_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"validate needs column(s) {missing}; the dataset has {dataset.column_names}")
    features = S.with_columns(dataset.features, S.VALIDATION_FEATURES)
    return map_stage(dataset, ValidateTransform(config), stage="validate", features=features,
                     status_column=S.VALIDATE_STATUS, batch_size=config.batch_size, num_proc=config.num_proc)


def validate_run(dataset: Dataset, config: ValidateConfig, run: RunConfig,
                 inputs: tuple[str | Path, ...] = ()) -> RunSummary | None:
    """Validate ``dataset`` on the shared runner: sharded over the launched processes, resumable.

    Under ``accelerate launch`` / ``torchrun`` each rank validates a contiguous run of chunks on its
    own device; rank 0 merges them into ``run.out/data/`` and writes ``run.json``. Validation is
    deterministic, so a resumed or differently sharded run gives the same rows.

    Args:
        dataset: candidates or pairs (see `run_validate`).
        config: the stage settings (``device="auto"`` picks each rank's GPU).
        run: the output folder, chunk size and overwrite policy.
        inputs: input paths the output folder must not be or contain.

    Returns:
        The run summary on rank 0 (statuses ``validate`` and ``decision``); ``None`` on other ranks.
    """

    def compute(rows: Dataset, device: str) -> tuple[Dataset, dict[str, dict[str, int]]]:
        validated, result = run_validate(rows, replace(config, device=device, num_proc=None))
        decisions = status_histogram(reason or "accepted" for reason in validated[S.REJECT_REASON])
        return validated, {"validate": result.statuses, "decision": decisions}

    settings = {k: v for k, v in asdict(config).items() if k not in ("batch_size", "num_proc")}
    return run_stage(dataset, compute, stage="validate", settings=settings, run=run, device=config.device,
                     inputs=inputs, max_pixels=config.max_pixels)


def validate_pairs(dataset: Dataset, config: ValidateConfig | None = None, **overrides: Any) -> Dataset:
    """Validate ``dataset`` and return it with the validation columns (convenience for `run_validate`).

    Args:
        dataset: candidates (``image``/``edited_image``) or pairs (pass ``original_column`` etc.).
        config: base settings (defaults when ``None``).
        **overrides: `ValidateConfig` fields to change, e.g. ``judge="ocr-lexicon"``.

    Returns:
        The validated dataset.
    """
    return run_validate(dataset, replace(config or ValidateConfig(), **overrides))[0]


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
    best: dict[str, tuple[tuple[float, float, float, int], int]] = {}
    for i in range(len(dataset)):
        row = {c: table[c][i] for c in cols}
        if not row[S.ACCEPTED]:
            continue
        key = (*preservation_key(row), -i)
        src = row[S.SOURCE_ID]
        if src not in best or key > best[src][0]:
            best[src] = (key, i)
    return dataset.select(sorted(i for _, i in best.values()))
