"""Generation at scale: instruct + edit chained, sharded over ranks, written in resumable parquet chunks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from safetypairs import schema as S
from safetypairs.edit import EditConfig, run_edit
from safetypairs.instruct import InstructConfig, run_instruct
from safetypairs.policy import load_policy
from safetypairs.runner import (
    CHUNKS_DIR,
    DATA_DIR,
    RUN_FILE,
    _check_run,
    _shared_run_id,
    _state,
    chunk_done,
    chunk_path,
    chunk_ranges,
    library_versions,
    merge_chunks,
    model_info,
    read_json,
    write_json,
)
from safetypairs.utils import progress

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class GenerateConfig:
    """Everything that decides the generated rows (chunking aside).

    Args:
        policy: a built-in policy name or a YAML path.
        instructor: an ``instructors`` spec (``template``, ``column:<name>``, ``hf-vlm:<id or path>``).
        editor: an ``editors`` spec (``ocr-inpaint``, ``diffusers:<id or path>``).
        candidates: edits per source, each with its own recorded seed.
        control: also edit the original with a no-op instruction (the artifact control).
        seed: the run seed all candidate seeds derive from.
        device: ``auto`` (the rank's GPU when present) or a torch device string.
        batch_size: rows per instructor / editor call.
        num_proc: `Dataset.map` processes (one machine, several GPUs) for `generate_pairs`.
        instructor_options: ``(key, value)`` options for the instructor backend.
        editor_options: ``(key, value)`` options for the editor backend.
        mask_column: a mask column for mask-guided (inpainting) editors.
    """

    policy: str = "llavaguard"
    instructor: str = "template"
    editor: str = "ocr-inpaint"
    candidates: int = 1
    control: bool = False
    seed: int = 0
    device: str = "auto"
    batch_size: int = 4
    num_proc: int | None = None
    instructor_options: tuple[tuple[str, Any], ...] = ()
    editor_options: tuple[tuple[str, Any], ...] = ()
    mask_column: str | None = None

    def __post_init__(self) -> None:
        self.instruct_config()  # both stage configs validate their fields up front
        self.edit_config()

    def instruct_config(self, device: str | None = None) -> InstructConfig:
        """The instruct stage's settings (``device`` overrides the configured one)."""
        return InstructConfig(instructor=self.instructor, policy=self.policy, device=device or self.device,
                              batch_size=self.batch_size, num_proc=self.num_proc,
                              instructor_options=tuple(self.instructor_options))

    def edit_config(self, device: str | None = None) -> EditConfig:
        """The edit stage's settings (``device`` overrides the configured one)."""
        return EditConfig(editor=self.editor, candidates=self.candidates, control=self.control, seed=self.seed,
                          device=device or self.device, batch_size=self.batch_size, num_proc=self.num_proc,
                          editor_options=tuple(self.editor_options), mask_column=self.mask_column)


def generate_pairs(
    dataset: Dataset,
    policy: str = "llavaguard",
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
        policy: a built-in policy name or a YAML path.
        instructor: an ``instructors`` spec.
        editor: an ``editors`` spec.
        candidates: edits per source.
        control: add the artifact-control image.
        **options: other `GenerateConfig` fields (seed, device, batch_size, num_proc,
            instructor_options, editor_options, mask_column).

    Returns:
        The candidate rows with instruct and edit columns (failures are status rows).

    Raises:
        ValueError: for a bad spec or setting.
    """
    config = GenerateConfig(policy=policy, instructor=instructor, editor=editor, candidates=candidates,
                            control=control, **options)
    instructed, _ = run_instruct(dataset, config.instruct_config())
    return run_edit(instructed, config.edit_config())[0]


@dataclass(frozen=True)
class RunConfig:
    """Where and how a sharded run writes.

    Args:
        out: the run folder (``chunks/``, ``data/``, ``run.json``).
        chunk_size: source rows per chunk (the unit of resumption and of rank work).
        source: how the source was named (recorded in ``run.json``).
    """

    out: str | Path
    chunk_size: int = 64
    source: str = ""

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


@dataclass
class RunSummary:
    """What a sharded run did (rank 0's view after the merge)."""

    out: Path
    rows_in: int
    rows_out: int
    statuses: dict[str, dict[str, int]]
    chunks_computed: int
    chunks_reused: int
    seconds: float
    files: list[str] = field(default_factory=list)

    def render(self) -> str:
        """A short plain-text summary for the terminal."""
        lines = [f"sources: {self.rows_in}  candidate rows: {self.rows_out}  "
                 f"chunks: {self.chunks_computed} computed, {self.chunks_reused} reused  ({self.seconds:.1f} s)"]
        for stage, counts in self.statuses.items():
            lines.append(f"{stage:<9} " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        lines.append(f"wrote {self.out / DATA_DIR} ({len(self.files)} parquet file(s)) and {self.out / RUN_FILE}")
        return "\n".join(lines)


def run_fingerprint(source: Dataset, config: GenerateConfig, chunk_size: int) -> str:
    """A hash of what decides the rows of every chunk: config, chunking and the source ids in order."""
    h = hashlib.sha256(json.dumps([asdict(config), chunk_size, len(source), source.column_names],
                                  sort_keys=True, default=str).encode())
    for batch in source.select_columns([S.SOURCE_ID]).iter(batch_size=10_000):
        h.update("\n".join(map(str, batch[S.SOURCE_ID])).encode())
    return h.hexdigest()[:20]


def _decoded(dataset: Dataset) -> Dataset:
    """Image columns back to decoding ``Image()`` so the written parquet loads as images."""
    from datasets import Image

    features = dataset.features.copy()
    for name, feature in features.items():
        if isinstance(feature, Image) and not feature.decode:
            features[name] = Image()
    return dataset.cast(features) if features != dataset.features else dataset


def _run_chunk(source: Dataset, span: tuple[int, int, int], config: GenerateConfig, out: Path, device: str,
               run_id: str) -> None:
    """Compute one chunk and write its parquet (image bytes embedded), then its JSON done-marker."""
    from safetypairs.runner import write_parquet

    index, start, stop = span
    t0 = time.perf_counter()
    rows = source.select(range(start, stop)).flatten_indices(keep_in_memory=True)
    instructed, instruct_result = run_instruct(rows, config.instruct_config(device))
    t1 = time.perf_counter()
    edited, edit_result = run_edit(instructed, config.edit_config(device))
    t2 = time.perf_counter()
    path = chunk_path(out, index, ".parquet")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_parquet(_decoded(edited), tmp)
    os.replace(tmp, path)
    write_json(chunk_path(out, index, ".json"), {
        "chunk": index, "run_id": run_id, "start": start, "stop": stop,
        "rows_in": stop - start, "rows_out": len(edited),
        "statuses": {"instruct": instruct_result.statuses, "edit": edit_result.statuses},
        "seconds": {"instruct": t1 - t0, "edit": t2 - t1, "write": time.perf_counter() - t2},
    })


def run_generate(source: Dataset, config: GenerateConfig, run: RunConfig) -> RunSummary | None:
    """Generate candidate rows for ``source``, sharded over the launched processes and resumable.

    Under ``accelerate launch`` / ``torchrun`` each rank takes a contiguous run of chunks, writes
    each finished chunk to ``out/chunks/`` (parquet with image bytes + a JSON marker) and skips
    chunks finished by an earlier, interrupted run; rank 0 then merges all chunks, in source
    order, into ``out/data/`` and writes ``out/run.json``. Seeds depend only on the run seed,
    source id and candidate, and chunks do not depend on the number of processes, so a resumed
    or differently sharded run gives the same rows.

    Args:
        source: the source rows.
        config: what to generate.
        run: where to write and the chunk size.

    Returns:
        The run summary on rank 0; ``None`` on the other ranks.

    Raises:
        ValueError: when ``out`` holds a different run or the source is empty.
        RuntimeError: when a chunk is missing at merge time or rows in != rows out.
    """
    if not len(source):  # no chunk would be written, so there would be nothing to merge or load
        raise ValueError("the source has no rows; nothing to generate")
    t0 = time.perf_counter()
    out = Path(run.out)
    state = _state(config.device)
    fingerprint = run_fingerprint(source, config, run.chunk_size)
    start_marker = _check_run(out, fingerprint)
    (out / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    if state.is_main_process and start_marker:  # so a resumed run can check its settings
        write_json(out / RUN_FILE, {"fingerprint": fingerprint, "status": "running", "source": run.source})
    device = str(state.device) if config.device == "auto" else config.device
    run_id = _shared_run_id(state)
    spans = chunk_ranges(len(source), run.chunk_size, state.process_index, state.num_processes)
    todo = [span for span in spans if not chunk_done(out, span[0])]
    logger.info("rank %d/%d on %s: %d chunk(s), %d already done", state.process_index, state.num_processes,
                device, len(spans), len(spans) - len(todo))
    for span in progress(todo, desc=f"generate (rank {state.process_index})"):
        _run_chunk(source, span, config, out, device, run_id)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    summary = _summarize(out, len(source), run.chunk_size, config.candidates, run_id)
    summary.seconds = time.perf_counter() - t0
    write_json(out / RUN_FILE, _run_metadata(source, config, run, fingerprint, summary, state.num_processes))
    return summary


def _summarize(out: Path, n_rows: int, chunk_size: int, candidates: int, run_id: str) -> RunSummary:
    """Merge the chunks and sum their markers' statuses; rows out must be rows in x candidates."""
    files, rows_out, markers = merge_chunks(out, -(-n_rows // chunk_size))
    if rows_out != n_rows * candidates:
        raise RuntimeError(f"{n_rows} sources x {candidates} candidates should give {n_rows * candidates} rows, "
                           f"got {rows_out}")
    statuses: dict[str, dict[str, int]] = {}
    for marker in markers:
        for stage, counts in marker["statuses"].items():
            merged = statuses.setdefault(stage, {})
            for key, value in counts.items():
                merged[key] = merged.get(key, 0) + value
    computed = sum(m.get("run_id") == run_id for m in markers)
    return RunSummary(out, n_rows, rows_out, {k: dict(sorted(v.items())) for k, v in statuses.items()},
                      computed, len(markers) - computed, 0.0, [str(f) for f in files])


def _run_metadata(source: Dataset, config: GenerateConfig, run: RunConfig, fingerprint: str,
                  summary: RunSummary, world: int) -> dict[str, Any]:
    markers = [read_json(chunk_path(summary.out, c, ".json")) or {}
               for c in range(-(-len(source) // run.chunk_size))]
    return {
        "fingerprint": fingerprint,
        "status": "complete",
        "source": run.source, "source_rows": len(source), "rows_out": summary.rows_out,
        "chunk_size": run.chunk_size, "num_processes": world,
        "config": asdict(config),
        "policy": load_policy(config.policy).id,
        "models": {"instructor": model_info(config.instructor), "editor": model_info(config.editor)},
        "seeds": {"run_seed": config.seed, "per_row": f"column {S.SEED!r}",
                  "candidate_seed": "sha256(f'{seed}:{source_id}:{candidate}')[:8] & 0x7fffffff"},
        "versions": library_versions(),
        "statuses": summary.statuses,
        "timings": {"wall_seconds_last_run": summary.seconds,
                    "chunk_seconds": {m["chunk"]: m["seconds"] for m in markers},
                    "chunks_computed_last_run": summary.chunks_computed,
                    "chunks_reused_last_run": summary.chunks_reused},
        "files": [os.path.relpath(f, summary.out) for f in summary.files],
    }


def generate_from_source(spec: str, config: GenerateConfig, run: RunConfig, split: str = "train") -> RunSummary | None:
    """Load a source (rank 0 first, so the `datasets` cache is built once) and `run_generate` it.

    Args:
        spec: ``demo[:n]``, a dataset folder, an image folder with metadata, or a hub dataset id.
        config: what to generate.
        run: where to write and the chunk size (``run.source`` defaults to ``spec``).
        split: the source split.

    Returns:
        The run summary on rank 0, ``None`` elsewhere.
    """
    from dataclasses import replace

    from safetypairs.sources import load_source

    state = _state(config.device)
    try:
        with state.main_process_first():
            source = load_source(spec, split=split)
        return run_generate(source, config, replace(run, source=run.source or spec))
    finally:
        if state.use_distributed:
            state.destroy_process_group()
