"""Pair validation: prove each edit is local (change mask, preservation outside it), real and label-flipping."""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from datasets import Dataset

from safetypairs import schema as S
from safetypairs.backends.encoders import lpips_arguments
from safetypairs.change import MaskParams
from safetypairs.images import DEFAULT_MAX_PIXELS, check_max_pixels
from safetypairs.policy import Policy, load_policy
from safetypairs.registry import check_options, parse_spec
from safetypairs.review import DECISIONS_FILE
from safetypairs.runner import RunConfig, RunSummary, run_stage
from safetypairs.stage import StageResult, map_stage
from safetypairs.thresholds import (
    Thresholds,
    decide_pixels,
    thresholds_for,
    thresholds_used,
)
from safetypairs.utils import Range, check_ranges, device_for_rank, status_histogram
from safetypairs.validate_models import (
    JUDGE_ERROR,
    composite_columns,
    encoder_metrics,
    judge_rows,
)
from safetypairs.validate_rows import (
    choose_references,
    empty_row,
    pixel_metrics,
    prepare_pair,
)

__all__ = ["ValidateConfig", "ValidateTransform", "decide_pixels", "run_validate", "select_best",
           "thresholds_for", "thresholds_used", "validate_pairs", "validate_run"]

logger = logging.getLogger(__name__)

# Every value `validate_status` (besides ``ok``) and `reject_reason` can take (None when accepted).
ROW_FAILURES = {
    S.NOT_UNSAFE: "the source row is labelled safe: set aside (a natural negative), never instructed or edited",
    "not_instructed": "the instruct stage wrote no instruction for this row (its instruct_status in validate_error)",
    "duplicate_candidate": "the editor returned the same image as an earlier candidate of this source",
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
    "no_change": "no connected change reaches min_element_fraction: the edit is indistinguishable from its reference",
    "not_local": "changed_fraction above max_changed_fraction: the change covers too much of the image",
    "background_changed": "SSIM/PSNR (or LPIPS/CLIP, when thresholds are set) outside the dilated mask too far off",
    "judge_unknown": "the judge could not label one of the images",
    "original_not_unsafe": "the judge does not call the original unsafe",
    "still_unsafe": "the judge still calls the edited image unsafe",
}
SIZE_POLICIES = ("reject", "resize")
CLIP_ALIASES = ("open_clip", "hf-clip")


REFERENCE_MODES = ("auto", "control", "original")


@dataclass(frozen=True)
class ValidateConfig:
    """Settings of the validation stage; every value is checked up front.

    Thresholds come from a preset or a calibration file (`safetypairs.thresholds`): ``pixel-exact``
    (paste / OpenCV inpainting / text re-rendering, ``python -m benchmarks.calibration``) for
    pixel-exact editors and ``latent-diffusion`` for ``diffusers:`` editors, chosen per row from its
    ``editor`` column unless ``thresholds`` names one; any threshold field set here overrides it.

    The edit is compared with a reference: with ``reference="auto"`` the row's artifact control
    (same editor and seed, no-op instruction) when it has one, else for a ``diffusers:`` editor the
    original's round trip through the editor's own VAE, else the original. The editor's own
    fingerprint then cancels, and the reference-vs-original difference is recorded as its noise floor.

    Attributes:
        original_column: the unsafe original (``image`` for candidates, ``unsafe_image`` for pairs:
            data with ``unsafe_image``/``safe_image`` and neither default column is read as pairs).
        edited_column: the edit (``edited_image`` for candidates, ``safe_image`` for pairs).
        control_column: the artifact control (used as the reference; composited with ``composite``).
        editor_column: the editor spec per row (picks the preset and the VAE round trip).
        category_column: policy category passed to the judge (``None`` when the column is absent).
        edit_status_column: rows whose value here is not ``"ok"`` are ``edit_failed`` (ignored if absent).
        policy: built-in policy name, YAML path or `Policy`, for the judge.
        judge: ``judges`` spec (e.g. ``"ocr-lexicon"``), or ``None`` for no label-flip check (a
            warning says so once, and ``label_flip_checked`` stays false).
        judge_all_rows: also judge rows the pixel checks already rejected (costs judge time).
        lpips: ``lpips:<alex|vgg|squeeze>`` spec or ``None``. An encoder that cannot load (e.g. no
            network for its weights) is skipped with a warning; ``metrics_ran`` says what ran.
        clip: ``open_clip:<arch>/<pretrained>`` or ``hf-clip:<id or path>`` spec, or ``None``.
        device: ``"auto"`` (GPU of the map rank when available) or a torch device.
        size_mismatch: ``"reject"`` (status ``size_mismatch``) or ``"resize"`` the edit to the
            original's size with LANCZOS and set ``validate_resized``.
        reference: one of `REFERENCE_MODES`: ``auto`` (control, else VAE round trip, else original),
            ``control`` (control, else original) or ``original`` (always the original).
        thresholds: a preset name (``pixel-exact``, ``latent-diffusion``) or a thresholds YAML file;
            ``None`` picks the preset from each row's editor.
        composite: replace the edit (and the control) by the original outside the feathered change
            mask + the edit inside; decided on the raw edit first, so decisions do not change.
        feather_px: width of the composite's soft edge beyond the dilated mask.
        max_side: images with a longer side are measured at this size (mask stored full size).
        min_side: images with a shorter side are ``too_small`` (32 = AlexNet-LPIPS' minimum).
        mask_open_px / mask_close_px: radii of the opening (drops speckle) and closing (fills holes).
        mask_min_region: connected changes smaller than this share of the image are dropped.
        dilate_fraction / dilate_min_px: margin around the change excluded from "outside" metrics
            (5 px covers the 7x7 SSIM window around a changed pixel, diagonal included).
        mask_delta_e ... min_clip_outside: `Thresholds` overrides (``None`` = from the preset or file).
        batch_size / num_proc: `Dataset.map` settings.
        max_pixels: images with more pixels are decoded reduced (JPEG) or are ``too_large``.
    """

    original_column: str = S.IMAGE
    edited_column: str = S.EDITED_IMAGE
    control_column: str = S.CONTROL_IMAGE
    editor_column: str = S.EDITOR
    category_column: str = S.CATEGORY
    edit_status_column: str = S.EDIT_STATUS
    policy: str | Policy = "llavaguard"
    judge: str | None = None
    judge_all_rows: bool = False
    lpips: str | None = None
    clip: str | None = None
    device: str = "auto"
    size_mismatch: str = "reject"
    reference: str = "auto"
    thresholds: str | None = None
    composite: bool = False
    feather_px: int = 6
    max_side: int = 1024
    min_side: int = 32
    mask_open_px: int = 1
    mask_close_px: int = 3
    mask_min_region: float = 0.0005
    dilate_fraction: float = 0.02
    dilate_min_px: int = 5
    spread_grid: int = 8
    spread_cell_min: float = 0.01
    mask_delta_e: float | None = None
    min_element_fraction: float | None = None
    max_changed_fraction: float | None = None
    max_change_spread: float | None = None
    min_ssim_outside: float | None = None
    min_psnr_outside: float | None = None
    max_lpips_outside: float | None = None
    min_clip_outside: float | None = None
    batch_size: int = 8
    num_proc: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)
        if self.size_mismatch not in SIZE_POLICIES:
            raise ValueError(f"size_mismatch must be one of {SIZE_POLICIES}, got {self.size_mismatch!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if len({self.original_column, self.edited_column, self.control_column}) < 3:
            raise ValueError("original_column, edited_column and control_column must differ")
        if self.judge is not None:
            check_options("judges", self.judge)
        if self.lpips is not None:
            spec = parse_spec("encoders", self.lpips)
            if spec.alias != "lpips":
                raise ValueError(f"lpips must be an 'lpips:<alex|vgg|squeeze>' spec, got {self.lpips!r}")
            lpips_arguments(spec.arg)
        if self.clip is not None and parse_spec("encoders", self.clip).alias not in CLIP_ALIASES:
            raise ValueError(f"clip must be an {' or '.join(CLIP_ALIASES)} spec, got {self.clip!r}")
        _check_ranges(self)
        thresholds_for(self, None)  # a bad file, preset or override fails here, not in the middle of a run
        from safetypairs.policy import load_policy

        load_policy(self.policy)

    def mask_params(self, thresholds: Thresholds) -> MaskParams:
        """The change-mask settings under ``thresholds``."""
        return MaskParams(thresholds.mask_delta_e, self.mask_open_px, self.mask_close_px, self.mask_min_region,
                          self.dilate_fraction, self.dilate_min_px)


def _check_ranges(c: ValidateConfig) -> None:
    """The ranges of the measuring settings (threshold overrides: `thresholds.RANGES`, via `thresholds_for`)."""
    ranges = {
        "max_side": Range(c.min_side), "min_side": Range(8), "mask_open_px": Range(0), "mask_close_px": Range(0),
        "mask_min_region": Range(0, 1, open_high=True), "dilate_fraction": Range(0, 0.5, open_high=True),
        "dilate_min_px": Range(0), "spread_grid": Range(1), "spread_cell_min": Range(0, 1, open_high=True),
        "feather_px": Range(0), "batch_size": Range(1), "num_proc": Range(1, optional=True),
    }
    check_ranges("ValidateConfig", {name: getattr(c, name) for name in ranges}, ranges)


class ValidateTransform:
    """Batched, picklable `Dataset.map` transform; holds only the config, loads models lazily."""

    def __init__(self, config: ValidateConfig) -> None:
        self.config = config

    @functools.cached_property
    def policy(self) -> Policy:
        """The policy categories are checked against (loaded once per process)."""
        return load_policy(self.config.policy)

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        """Measure and decide every row of ``batch`` (and composite it with ``config.composite``).

        Args:
            batch: columns of the batch (original and edited image columns required).
            rank: the `Dataset.map` process rank (picks the GPU).

        Returns:
            The validation columns (`schema.VALIDATION_FEATURES`), one value per row, the two image
            columns with the cells that could not be decoded set to null, and (with ``composite``) the
            composited edited (and control) columns.
        """
        c = self.config
        n = len(batch[c.original_column])
        rows = [empty_row() for _ in range(n)]
        images = {c.original_column: list(batch[c.original_column]), c.edited_column: list(batch[c.edited_column])}
        pairs = [p for i in range(n) if (p := prepare_pair(c, self.policy, batch, i, rows[i], images)) is not None]
        device = device_for_rank(c.device, rank)
        choose_references(c, batch, pairs, device)
        editors = batch.get(c.editor_column) or [None] * n
        for pair in pairs:
            rows[pair.index][S.VALIDATE_THRESHOLDS], thresholds = thresholds_for(c, editors[pair.index])
            pixel_metrics(c, pair, rows[pair.index], thresholds)
        encoder_metrics(c, pairs, rows, device)
        for pair in pairs:
            rows[pair.index][S.REJECT_REASON] = decide_pixels(thresholds_for(c, editors[pair.index])[1],
                                                              rows[pair.index])
        judge_rows(c, batch, pairs, rows, device)
        for row in rows:
            row[S.ACCEPTED] = row[S.VALIDATE_STATUS] == S.OK and row[S.REJECT_REASON] is None
        out = {**images, **{name: [row[name] for row in rows] for name in S.VALIDATION_FEATURES}}
        if c.composite:
            out.update(composite_columns(c, batch, pairs, rows))
        return out

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
    config = for_columns(dataset, config or ValidateConfig())
    _warn_without_judge(config)
    missing = [c for c in (config.original_column, config.edited_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"validate needs column(s) {missing}; the dataset has {dataset.column_names}")
    features = S.with_columns(dataset.features, S.VALIDATION_FEATURES)
    return map_stage(dataset, ValidateTransform(config), stage="validate", features=features,
                     status_column=S.VALIDATE_STATUS, batch_size=config.batch_size, num_proc=config.num_proc)


def for_columns(dataset: Dataset, config: ValidateConfig) -> ValidateConfig:
    """``config`` reading a released ``pairs`` table (``unsafe_image``/``safe_image``) when the data has
    those columns and neither default one (explicitly chosen columns are kept)."""
    names = dataset.column_names
    defaults = (config.original_column, config.edited_column) == (S.IMAGE, S.EDITED_IMAGE)
    if defaults and S.IMAGE not in names and S.EDITED_IMAGE not in names and {S.UNSAFE_IMAGE, S.SAFE_IMAGE} <= set(names):
        logger.info("validate: reading pairs (%s -> %s)", S.UNSAFE_IMAGE, S.SAFE_IMAGE)
        return replace(config, original_column=S.UNSAFE_IMAGE, edited_column=S.SAFE_IMAGE)
    return config


@functools.lru_cache(maxsize=1)
def _warned_without_judge() -> bool:
    logger.warning("validate: no --judge, so nothing checks that the edit flips the label (original unsafe, edit "
                   "safe); accepted pairs passed the pixel checks only (label_flip_checked = false, said in the "
                   "card). Pass --judge (e.g. ocr-lexicon, hf-vlm:<model>) to check it.")
    return True


def _warn_without_judge(config: ValidateConfig) -> None:
    """Warn once per process when no judge checks the label flip."""
    if config.judge is None:
        _warned_without_judge()


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

    config = for_columns(dataset, config)
    _warn_without_judge(config)

    def compute(rows: Dataset, device: str) -> tuple[Dataset, dict[str, dict[str, int]]]:
        validated, result = run_validate(rows, replace(config, device=device, num_proc=None))
        decisions = status_histogram(reason or "accepted" for reason in validated[S.REJECT_REASON])
        return validated, {"validate": result.statuses, "decision": decisions}

    decided_with = thresholds_used(dataset, config)  # the values too, so an edited thresholds file is a new run
    settings = {**{k: v for k, v in asdict(config).items() if k not in ("batch_size", "num_proc")},
                "thresholds_used": decided_with}
    return run_stage(dataset, compute, stage="validate", settings=settings, run=run, device=config.device,
                     finalize=lambda work, rows, summary: {"thresholds": decided_with}, inputs=inputs,
                     max_pixels=config.max_pixels, keep=(DECISIONS_FILE,))  # human decisions survive --overwrite


def validate_pairs(dataset: Dataset, config: ValidateConfig | None = None, **overrides: Any) -> Dataset:
    """Validate ``dataset`` and return it with the validation columns (convenience for `run_validate`).

    Args:
        dataset: candidates (``image``/``edited_image``) or released pairs (``unsafe_image``/``safe_image``,
            recognised by their columns).
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
