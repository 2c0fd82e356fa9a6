"""Pair validation: prove each edit is local (change mask, preservation outside it), real and label-flipping."""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from datasets import Dataset

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.backends.registry import check_options, check_ready, parse_spec, usage_counts
from safetypairs.engine.runner import RunConfig, RunSummary, for_rank, run_stage
from safetypairs.engine.stage import StageResult, map_stage
from safetypairs.images import DEFAULT_MAX_PIXELS, RUN_PNG_LEVEL, check_max_pixels, check_png_level
from safetypairs.policy import Policy, load_policy
from safetypairs.review.store import DECISIONS_FILE
from safetypairs.utils import Range, check_ranges, device_for_rank, status_histogram
from safetypairs.validate.change import MaskParams
from safetypairs.validate.composite import composite_columns
from safetypairs.validate.decision import accept, decide_pixels, limits_json
from safetypairs.validate.judge import judge_rows
from safetypairs.validate.measurements import encoder_metrics, pixel_metrics
from safetypairs.validate.originals import Originals
from safetypairs.validate.pair import empty_row, prepare_pair
from safetypairs.validate.references import REFERENCE_MODES, choose_references
from safetypairs.validate.thresholds import Thresholds, thresholds_for, thresholds_used

__all__ = ["ValidateConfig", "ValidateTransform", "run_validate", "validate_pairs", "validate_run"]

logger = logging.getLogger(__name__)

SIZE_POLICIES = ("reject", "resize")
CLIP_ALIASES = ("open_clip", "hf-clip")


@dataclass(frozen=True)
class ValidateConfig:
    """Settings of the validation stage; every value is checked up front.

    Thresholds come from a preset or a calibration file (`safetypairs.validate.thresholds`): ``pixel-exact``
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
        edit_status_column: rows whose value here is not ``"ok"`` are ``not_edited``, with that status as their
            fate (ignored if absent).
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
        png_level: zlib level (0-9) of the PNGs of the new images the stage stores (its run folder's change masks and composites);
            the pixels are the same at every level, so it is not part of a run's fingerprint. Default
            `images.RUN_PNG_LEVEL` (1: 3-5x faster to write than 6 for ~13% more bytes).
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
    png_level: int = RUN_PNG_LEVEL

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)
        check_png_level(self.png_level)
        if self.size_mismatch not in SIZE_POLICIES:
            raise ValueError(f"size_mismatch must be one of {SIZE_POLICIES}, got {self.size_mismatch!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if len({self.original_column, self.edited_column, self.control_column}) < 3:
            raise ValueError("original_column, edited_column and control_column must differ")
        if self.judge is not None:
            check_ready("judges", self.judge)
        if self.lpips is not None:
            spec = parse_spec("encoders", self.lpips)
            if spec.alias != "lpips":
                raise ValueError(f"lpips must be an 'lpips:<alex|vgg|squeeze>' spec, got {self.lpips!r}")
            check_options("encoders", self.lpips)
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
    """Batched, picklable `Dataset.map` transform; holds only the config, loads models lazily.

    What it computes once per original for its candidates (`Originals`) lives in the process that made it: it is
    not pickled, so the map fingerprint and the processes of a multi-process map each start without it.
    """

    def __init__(self, config: ValidateConfig) -> None:
        self.config = config

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    @functools.cached_property
    def originals(self) -> Originals:
        """The decoded originals, round trips, reference CIELAB values and verdicts of this map in this process."""
        return Originals()

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
            columns with the cells that could not be decoded set to null, the category column with each
            category as its policy code, and (with ``composite``) the composited edited (and control) columns.
        """
        c = self.config
        n = len(batch[c.original_column])
        rows = [empty_row() for _ in range(n)]
        images = {c.original_column: list(batch[c.original_column]), c.edited_column: list(batch[c.edited_column])}
        pairs = [p for i in range(n)
                 if (p := prepare_pair(c, self.policy, batch, i, rows[i], images, self.originals)) is not None]
        device = device_for_rank(c.device, rank)
        choose_references(c, batch, pairs, device, self.originals)
        editors = batch.get(c.editor_column) or [None] * n
        limits: dict[int, Thresholds] = {}
        for pair in pairs:
            row = rows[pair.index]
            row[S.VALIDATE_THRESHOLDS], limits[pair.index] = thresholds_for(c, editors[pair.index])
            row[S.VALIDATE_LIMITS] = limits_json(limits[pair.index])
            pixel_metrics(c, pair, row, limits[pair.index], self.originals)
        encoder_metrics(c, pairs, rows, device)
        for pair in pairs:
            rows[pair.index][S.REJECT_REASON], rows[pair.index][S.REJECT_DETAIL] = decide_pixels(
                limits[pair.index], rows[pair.index])
        judge_rows(c, batch, pairs, rows, device, self.originals)
        for row in rows:
            accept(row)
        out = {**images, **{name: [row[name] for row in rows] for name in S.VALIDATION_FEATURES}}
        if c.category_column in batch:  # "O1: Hate, ...", "o1" or an alias -> "O1", as the instruct stage writes it
            out[c.category_column] = [self.policy.resolve(v) or v for v in batch[c.category_column]]
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
                     status_column=S.VALIDATE_STATUS, batch_size=config.batch_size, num_proc=config.num_proc,
                     png_level=config.png_level)


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


# ValidateConfig fields that do not decide the rows (left out of the run fingerprint, so a resume may change them)
NOT_FINGERPRINTED = ("batch_size", "num_proc", "png_level")


def validate_run(dataset: Dataset, config: ValidateConfig, run: RunConfig) -> RunSummary | None:
    """Validate ``dataset`` on the shared runner: sharded over the launched processes, resumable.

    Under ``accelerate launch`` / ``torchrun`` the ranks claim chunks as they go, each on its
    own device; rank 0 merges them into ``run.out/data/`` and writes ``run.json``. Validation is
    deterministic, so a resumed or differently sharded run gives the same rows.

    Args:
        dataset: candidates or pairs (see `run_validate`).
        config: the stage settings (``device="auto"`` picks each rank's GPU).
        run: the output folder, chunk size, overwrite policy and the inputs it must not be or contain.

    Returns:
        The run summary on rank 0 (statuses ``validate`` and ``decision``); ``None`` on other ranks.
    """

    config = for_columns(dataset, config)
    _warn_without_judge(config)

    def compute(rows: Dataset, device: str) -> tuple[Dataset, dict[str, dict[str, int]]]:
        validated, result = run_validate(rows, for_rank(config, device))  # checked once, not per chunk
        decisions = status_histogram(reason or ST.ACCEPTED for reason in validated[S.REJECT_REASON])
        return validated, {"validate": result.statuses, "decision": decisions}

    decided_with = thresholds_used(dataset, config)  # the values too, so an edited thresholds file is a new run
    settings = {**{k: v for k, v in asdict(config).items() if k not in NOT_FINGERPRINTED},
                "thresholds_used": decided_with}
    return run_stage(dataset, compute, stage="validate", settings=settings, run=run, device=config.device,
                     finalize=lambda work, files, summary: {"thresholds": decided_with},
                     max_pixels=config.max_pixels, keep=(DECISIONS_FILE,), usage=usage_counts)  # human decisions survive --overwrite


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


def check_measured(summary: RunSummary) -> None:
    """Refuse a finished validate run in which no row could be measured, saying why (the folder is kept).

    Raises:
        ValueError: naming the statuses, the first row's error and the run folder.
    """
    statuses = summary.statuses.get("validate", {})
    if statuses.get(ST.OK):
        return
    from safetypairs.engine.datafiles import read_rows

    errors = [e for e in read_rows(summary.out).select_columns([S.VALIDATE_ERROR])[S.VALIDATE_ERROR] if e]
    raise ValueError(f"no row could be measured (validate: {statuses}); the first error: "
                     f"{errors[0] if errors else 'none recorded'} (the run is in {summary.out} for inspection)")
