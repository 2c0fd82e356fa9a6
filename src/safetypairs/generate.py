"""Generation at scale: instruct + edit chained, sharded over ranks, written in resumable parquet chunks."""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.backends.registry import model_info, unload_backends, usage_counts
from safetypairs.engine.datafiles import DataFiles, read_rows
from safetypairs.edit import EditConfig, run_edit
from safetypairs.images import DEFAULT_MAX_PIXELS, RUN_PNG_LEVEL
from safetypairs.instruct import InstructConfig, row_status, run_instruct, status_error
from safetypairs.policy import Policy, load_policy
from safetypairs.utils import device_for_rank
from safetypairs.engine.runner import RunConfig, RunSummary, for_rank, run_stage, session
from safetypairs.engine.stage import StageResult

if TYPE_CHECKING:
    from safetypairs.sources import SourceColumns

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class GenerateConfig:
    """Everything that decides the generated rows (chunking aside).

    Args:
        policy: a built-in policy name, a YAML path or a `Policy`.
        instructor: an ``instructors`` spec (``template``, ``column:<name>``, ``hf-vlm:<id or path>``).
        editor: an ``editors`` spec (``ocr-inpaint``, ``diffusers:<id or path>``).
        candidates: edits per source, each with its own recorded seed.
        control: also edit the original with a no-op instruction (the artifact control).
        seed: the run seed all candidate seeds derive from.
        device: ``auto`` (the rank's GPU when present) or a torch device string.
        batch_size: source rows per instructor call (and per editor call unless ``edit_batch_size`` is set).
        edit_batch_size: source rows per edit batch (each makes ``candidates`` edits, plus a control); unset:
            ``batch_size``. The diffusers editor also caps the images of one pipeline call (its ``max_batch``).
        keep_instructor: keep the instructor loaded while the editor runs. Off: each chunk's rows are
            instructed, every model is freed (and CUDA's cached blocks), the rows are edited and the editor is
            freed in turn, so only one model is in the accelerator's memory at a time, at the cost of loading both
            once per chunk (seconds to a minute each for 7B-20B models, against an hour of editing per 64-source
            chunk). On: both stay loaded across chunks (when they fit together). ``None`` (the default): off when
            the models run on an accelerator (a GPU), on for the CPU, where freeing saves no accelerator memory and
            the reloads would cost each chunk.
        num_proc: `Dataset.map` processes (one machine, several GPUs) for `generate_pairs`.
        instructor_options: ``(key, value)`` options for the instructor backend.
        editor_options: ``(key, value)`` options for the editor backend.
        mask_column: a mask column for mask-guided (inpainting) editors.
        max_pixels: images with more pixels are decoded reduced (JPEG) or get status ``too_large``;
            an output image cell that does not decode within it is stored as null.
        png_level: zlib level (0-9) of the edits' and controls' PNGs in the run folder (`EditConfig`); not
            part of the fingerprint (the pixels are the same at every level).
    """

    policy: str | Policy = "llavaguard"
    instructor: str = "template"
    editor: str = "ocr-inpaint"
    candidates: int = 1
    control: bool = False
    seed: int = 0
    device: str = "auto"
    batch_size: int = 4
    edit_batch_size: int | None = None
    keep_instructor: bool | None = None
    num_proc: int | None = None
    instructor_options: tuple[tuple[str, Any], ...] = ()
    editor_options: tuple[tuple[str, Any], ...] = ()
    mask_column: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    png_level: int = RUN_PNG_LEVEL

    def __post_init__(self) -> None:
        if self.edit_batch_size is not None and self.edit_batch_size < 1:
            raise ValueError(f"edit_batch_size must be >= 1, got {self.edit_batch_size}")
        self.stage_configs  # noqa: B018 - both stage configs check their fields up front (made once, kept)

    @functools.cached_property
    def stage_configs(self) -> tuple[InstructConfig, EditConfig]:
        """The instruct and edit stages' settings, made (and checked) once per config."""
        instruct = InstructConfig(instructor=self.instructor, policy=self.policy, device=self.device,
                                  batch_size=self.batch_size, num_proc=self.num_proc,
                                  instructor_options=tuple(self.instructor_options), max_pixels=self.max_pixels)
        edit = EditConfig(editor=self.editor, candidates=self.candidates, control=self.control, seed=self.seed,
                          device=self.device,
                          batch_size=self.batch_size if self.edit_batch_size is None else self.edit_batch_size,
                          num_proc=self.num_proc,
                          editor_options=tuple(self.editor_options), mask_column=self.mask_column,
                          max_pixels=self.max_pixels, png_level=self.png_level)
        return instruct, edit


def generate_pairs(
    dataset: Dataset,
    policy: str | Policy = "llavaguard",
    *,
    instructor: str = "template",
    editor: str = "ocr-inpaint",
    candidates: int = 1,
    control: bool = False,
    **options: Any,
) -> Dataset:
    """Instruct and edit every source row in this process: ``len(dataset) * candidates`` rows.

    Args:
        dataset: source rows (``image``, ``category``, ``rationale``, ``source_id``).
        policy: a built-in policy name, a YAML path or a `Policy` (`load_policy`).
        instructor: an ``instructors`` spec.
        editor: an ``editors`` spec.
        candidates: edits per source.
        control: add the artifact-control image.
        **options: other `GenerateConfig` fields (seed, device, batch_size, num_proc,
            instructor_options, editor_options, mask_column).

    Returns:
        The candidate rows with instruct and edit columns (failures are status rows).

    Raises:
        ValueError: for a bad spec or setting, or a source in which no row can be instructed (`check_source`).
    """
    config = GenerateConfig(policy=policy, instructor=instructor, editor=editor, candidates=candidates,
                            control=control, **options)
    check_source(dataset, config.policy)
    return run_generate(dataset, config)[0]


def run_generate(dataset: Dataset, config: GenerateConfig, device: str | None = None
                 ) -> tuple[Dataset, dict[str, StageResult]]:
    """Instruct and edit every row in memory (this process, or ``config.num_proc`` map processes).

    Args:
        dataset: source rows.
        config: what to generate.
        device: one rank's device for both models, in this process (`runner.for_rank`); default
            ``config.device`` and ``config.num_proc``.

    Returns:
        The candidate rows and ``{"instruct": StageResult, "edit": StageResult}``.

    Unless the instructor is kept (``config.keep_instructor``; by default on the CPU only), every model is freed
    after instructing and again after editing (`backends.registry.unload_backends`), so the instructor and the
    editor are never in the accelerator's memory together.
    """
    instruct, edit = config.stage_configs
    if device is not None:
        instruct, edit = for_rank(instruct, device), for_rank(edit, device)
    keep = config.keep_instructor
    if keep is None:
        keep = device_for_rank(device or config.device, None) == "cpu"
    instructed, instruct_result = run_instruct(dataset, instruct)
    if not keep:
        unload_backends()
    edited, edit_result = run_edit(instructed, edit)
    if not keep:  # the next chunk's instructor then loads without the editor beside it
        unload_backends()
    return edited, {"instruct": instruct_result, "edit": edit_result}


# GenerateConfig fields that do not decide the rows (left out of the run fingerprint, so a resume may change them)
NOT_FINGERPRINTED = ("batch_size", "edit_batch_size", "keep_instructor", "num_proc", "png_level")


def run_settings(config: GenerateConfig) -> dict[str, Any]:
    """The settings that decide a run's rows (its fingerprint and ``run.json``'s ``settings``)."""
    return {k: v for k, v in asdict(config).items() if k not in NOT_FINGERPRINTED}


def generate_run(source: Dataset, config: GenerateConfig, run: RunConfig) -> RunSummary | None:
    """Generate candidate rows for ``source`` on the shared runner: sharded over the launched processes, resumable.

    Under ``accelerate launch`` / ``torchrun`` the ranks claim chunks as they go and skip
    chunks an interrupted run finished; rank 0 merges them into ``out/data/`` and writes
    ``out/run.json`` (models, seeds, versions, policy, timings). A row depends only on the run seed,
    the row and the settings, so a resumed or differently sharded run gives the same rows.

    Args:
        source: the source rows.
        config: what to generate.
        run: where to write, the chunk size, the overwrite policy and the inputs ``run.out`` must not be.

    Returns:
        The run summary on rank 0; ``None`` on the other ranks.

    Raises:
        ValueError: for an empty source, or one in which no row can be instructed (`check_source`).
        OutputDirError: when ``out`` holds a different run, other files, or is locked by a live process.
        RuntimeError: when a chunk is missing at merge time or rows in != rows out.
    """
    policy_id = load_policy(config.policy).id
    check_source(source, config.policy)

    def compute(rows: Dataset, device: str) -> tuple[Dataset, dict[str, dict[str, int]]]:
        edited, results = run_generate(rows, config, device)
        return edited, {stage: result.statuses for stage, result in results.items()}

    def provenance(work: Path, files: DataFiles, summary: RunSummary) -> dict[str, Any]:
        return {
            "policy": policy_id,
            "models": {"instructor": model_info("instructors", config.instructor),
                       "editor": model_info("editors", config.editor)},
            "seeds": {"run_seed": config.seed, "per_row": f"column {S.SEED!r}",
                      "candidate_seed": "sha256(f'{seed}:{source_id}:{candidate}')[:8] & 0x7fffffff"},
        }

    return run_stage(source, compute, stage="generate", settings=run_settings(config), run=run,
                     device=config.device, rows_per_input=config.candidates, finalize=provenance,
                     max_pixels=config.max_pixels, usage=usage_counts)


def generate_from_source(spec: str, config: GenerateConfig, run: RunConfig, split: str = "train",
                         columns: SourceColumns | None = None) -> RunSummary | None:
    """Load a source (rank 0 first, so the `datasets` cache is built once) and `generate_run` it.

    Args:
        spec: ``demo[:n]``, an image folder with ``metadata.jsonl``/``.csv``, a ``save_to_disk`` folder,
            parquet files, or a hub dataset id (see `sources.load_source`).
        config: what to generate.
        run: where to write and the chunk size (``run.source`` defaults to ``spec``).
        split: the source split.
        columns: which source columns hold the image, category, rationale, id and label.

    Returns:
        The run summary on rank 0, ``None`` elsewhere.

    Raises:
        ValueError: when no row can be instructed, before the run (`check_source`), or when the
            finished run made no edit (`check_survivors`: the run folder stays for inspection).
        OutputDirError: when ``run.out`` is, contains or lies inside ``spec`` (before anything is read).
    """
    from safetypairs.sources import load_source

    run = run.reading(spec)
    with session(config.device) as state:
        with state.main_process_first():
            source = load_source(spec, split=split, columns=columns)
        summary = generate_run(source, config, run)
    if summary is not None:
        check_survivors(summary)
    return summary


_FIXES = {
    ST.UNKNOWN_CATEGORY: "pass --category-column NAME if another column holds the category, or list the value under "
                      "a category's `aliases` in a policy file (--policy FILE)",
    ST.NOT_UNSAFE: "generate edits unsafe images; check --label-column (rows labelled safe, or with an 'NA' "
                  "category, are set aside as natural negatives)",
    ST.NO_VIOLATION_FOUND: "the template instructor finds violations only as lexicon words in the image's text; "
                          "use --instructor hf-vlm:<model> or column:<name> for other content",
    ST.MISSING_INSTRUCTION: "fill the instruction column, or use another --instructor",
}


def check_source(source: Dataset, policy: str | Policy) -> None:
    """Refuse, before any model loads, a source in which no row can be instructed (reading no image).

    Raises:
        ValueError: naming how many rows fail for which reason, an example value and the fix.
    """
    if not len(source):
        return  # an empty source is the runner's (or the caller's) clear error
    policy = load_policy(policy)
    names = source.column_names
    categories = source[S.CATEGORY] if S.CATEGORY in names else [None] * len(source)
    labels = source[S.SOURCE_LABEL] if S.SOURCE_LABEL in names else [None] * len(source)
    failures: dict[str, list[Any]] = {}
    for category, label in zip(categories, labels):
        status, code = row_status(category, label, policy)
        if code is not None:
            return
        failures.setdefault(status, []).append(category)
    safe = failures.pop(ST.NOT_UNSAFE, [])
    aside = f"{len(safe)} row(s) labelled safe are set aside as natural negatives" if safe else ""
    if not failures:
        raise ValueError(f"no source row can be instructed: all {aside} -> {_FIXES[ST.NOT_UNSAFE]}")
    parts = [f"{len(values)} row(s): {status_error(status, values[0], policy)}"
             + (f" (values: {', '.join(map(repr, sorted(set(map(str, values)))[:3]))})" if len(set(values)) > 1 else "")
             + f" -> {_FIXES[status]}" for status, values in failures.items()]
    raise ValueError("no source row can be instructed: " + "; ".join(parts + ([aside] if aside else [])))


def check_survivors(summary: RunSummary) -> None:
    """Refuse a finished run that made no edit, saying why (the run folder is kept for inspection).

    When one input-level reason explains why no row was instructed, the error names it and its fix;
    otherwise, when no edit succeeded, it names the statuses and the first row's edit error.

    Raises:
        ValueError: naming the reason or statuses, the count, the fix or first error, and the run folder.
    """
    instruct = {k: v for k, v in summary.statuses.get("instruct", {}).items() if k != ST.NOT_UNSAFE}
    where = f"(the run is in {summary.out} for inspection: %s says more per row)"
    if not instruct.get(ST.OK) and len(instruct) == 1 and next(iter(instruct)) in _FIXES:
        status, n = next(iter(instruct.items()))
        raise ValueError(f"no row was instructed: all {n} rows ended {status} -> {_FIXES[status]} "
                         + where % S.INSTRUCT_ERROR)
    edit = summary.statuses.get("edit")
    if edit is None or edit.get(ST.OK):
        return
    rows = read_rows(summary.out).select_columns([S.EDIT_STATUS, S.EDIT_ERROR, S.INSTRUCT_ERROR]).to_list()
    column = S.EDIT_ERROR if any(r[S.EDIT_STATUS] != ST.NOT_INSTRUCTED for r in rows) else S.INSTRUCT_ERROR
    errors = [r[column] for r in rows if r[column]]  # the edit's own errors, else why nothing was instructed
    raise ValueError(f"no row was edited (edit: {edit}; instruct: {instruct}); the first error: "
                     f"{errors[0] if errors else 'none recorded'} " + where % column)
