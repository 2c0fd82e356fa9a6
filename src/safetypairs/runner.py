"""The one run folder every sharded stage writes: fingerprint, chunks, rank shards, lock, resume, merge, ``run.json``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Image, load_dataset
from datasets.table import embed_table_storage
from datasets.utils.py_utils import convert_file_size_to_int

from safetypairs.images import DEFAULT_MAX_PIXELS, ImageError, reencoded
from safetypairs.utils import OutputDirError, progress

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
IMAGES_STATUS = "images"  # status histogram key of the image cells the writer nulled or reduced
CHUNKS_DIR = "chunks"
DATA_DIR = "data"
LOCK_FILE = ".lock"
PARTIAL_SUFFIX = ".partial"
ROW_GROUP_SIZE = 64  # rows per parquet row group: bounds memory with images
MERGE_ROWS = 2000  # rows per merged data file (whole chunks)
BARRIER_TIMEOUT = timedelta(hours=float(os.environ.get("SAFETYPAIRS_BARRIER_TIMEOUT_HOURS", "6")))

# compute(chunk rows, device) -> (output rows, {stage name: status histogram})
ChunkFn = Callable[[Dataset, str], "tuple[Dataset, dict[str, dict[str, Any]]]"]
# finalize(work folder, merged rows, summary) -> extra run.json fields (rank 0, before the folder moves into place)
Finalize = Callable[[Path, Dataset, "RunSummary"], "Mapping[str, Any] | None"]


class RunLockedError(OutputDirError):
    """Another live process is writing the same run folder."""


@dataclass(frozen=True)
class RunConfig:
    """Where and how a sharded run writes.

    Args:
        out: the run folder. It appears whole when the run finishes; until then the work lives in the
            sibling ``<out>.partial/`` (chunks, ``run.json``, the lock), where a restarted run resumes.
        chunk_size: input rows per chunk (the unit of resumption and of rank work).
        source: how the input was named (recorded in ``run.json``).
        overwrite: replace a finished ``out`` that holds a different run or other files.
    """

    out: str | Path
    chunk_size: int = 64
    source: str = ""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


@dataclass
class RunSummary:
    """What a sharded run did (rank 0's view after the merge)."""

    stage: str
    out: Path
    rows_in: int
    rows_out: int
    statuses: dict[str, dict[str, int]]
    chunks_computed: int
    chunks_reused: int
    seconds: float
    files: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def render(self) -> str:
        """A short plain-text summary for the terminal."""
        lines = [f"{self.stage}: {self.rows_in} rows in, {self.rows_out} out  chunks: {self.chunks_computed} "
                 f"computed, {self.chunks_reused} reused  ({self.seconds:.1f} s)"]
        for stage, counts in self.statuses.items():
            lines.append(f"  {stage:<9} " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        lines.append(f"wrote {self.out} ({len(self.files)} data file(s), {RUN_FILE})")
        return "\n".join(lines)


def process_state(device: str = "auto") -> Any:
    """The accelerate process state (``cpu=True`` without CUDA: gloo between CPU processes)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


@contextmanager
def session(device: str = "auto") -> Iterator[Any]:
    """The process state for one command; a distributed process group is torn down on exit, errors included."""
    state = process_state(device)
    try:
        yield state
    finally:
        if state.use_distributed:
            state.destroy_process_group()


def rank_device(state: Any, device: str) -> str:
    """``device`` as given, or this rank's device for ``"auto"``."""
    return str(state.device) if device == "auto" else device


def partial_dir(out: Path) -> Path:
    """The sibling folder an unfinished run works in."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def check_not_input(out: str | Path, inputs: tuple[str | Path, ...]) -> None:
    """Refuse an output folder that is an input, contains one or lies inside one (writing or replacing it
    would destroy or pollute the input).

    Raises:
        OutputDirError: naming the input.
    """
    target = Path(out).resolve()
    for given in inputs:
        path = Path(given).resolve()
        if path == target or target in path.parents or path in target.parents:
            raise OutputDirError(f"--out {str(out)!r} is the input {str(given)!r}, contains it or lies inside it; "
                                 "choose another folder")


def run_stage(data: Dataset, compute: ChunkFn, *, stage: str, settings: Mapping[str, Any], run: RunConfig,
              device: str = "auto", rows_per_input: int = 1,
              finalize: Finalize | None = None,
              inputs: tuple[str | Path, ...] = (), max_pixels: int = DEFAULT_MAX_PIXELS) -> RunSummary | None:
    """Run ``compute`` over ``data`` in fixed-size chunks, sharded over the launched processes, resumable.

    Under ``accelerate launch`` / ``torchrun`` each rank takes a contiguous run of global chunks (so
    chunk contents do not depend on the number of processes), writes each finished chunk atomically
    (parquet with image bytes + a JSON marker) and skips chunks an interrupted run finished. Rank 0
    holds the folder's lock, checks the settings fingerprint before any rank starts, merges the
    chunks in input order after a barrier, calls ``finalize``, and renames the work folder into place.

    Args:
        data: the input rows.
        compute: ``(chunk rows, device) -> (output rows, {stage: status histogram})``.
        stage: the stage name (run.json, progress bar).
        settings: everything that decides the output rows (hashed into the fingerprint, recorded).
        run: the folder, chunk size and overwrite policy.
        device: ``"auto"`` (the rank's GPU when present) or a torch device string.
        rows_per_input: output rows per input row (checked at the merge).
        finalize: rank 0's hook ``(work folder, merged rows, summary) -> extra run.json fields``, run
            before the folder is renamed into place (write reports there).
        inputs: input paths ``out`` must not be or contain.
        max_pixels: the pixel cap of the image cells the chunks keep (see `write_parquet`).

    Returns:
        The summary on rank 0 (also for a finished folder that is reused without computing);
        ``None`` on the other ranks.

    Raises:
        ValueError: for empty input.
        OutputDirError: when ``out`` is unusable, locked by a live process or holds another run.
        RuntimeError: when chunks are missing at merge time or rows out != rows in x rows_per_input.
    """
    if not len(data):
        raise ValueError(f"{stage}: the input has no rows; nothing to do")
    t0 = time.perf_counter()
    out = Path(run.out)
    check_not_input(out, inputs)
    state = process_state(device)
    # only rank 0 opens and finishes the folder: the other ranks skip hashing every input byte
    fingerprint = (run_fingerprint(data, stage, settings, run.chunk_size, rows_per_input)
                   if state.is_main_process else "")
    opened = _broadcast(state, lambda: _open_run(out, fingerprint, stage, run))
    if "error" in opened:
        raise OutputDirError(opened["error"])
    if opened.get("reused"):
        return _reused_summary(out, stage) if state.is_main_process else None
    work, run_id = Path(opened["work"]), opened["run_id"]
    try:
        spans = chunk_ranges(len(data), run.chunk_size, state.process_index, state.num_processes)
        todo = [span for span in spans if not chunk_done(work, span[0])]
        dev = rank_device(state, device)
        logger.info("%s rank %d/%d on %s: %d chunk(s), %d already done", stage, state.process_index,
                    state.num_processes, dev, len(spans), len(spans) - len(todo))
        for span in progress(todo, desc=f"{stage} (rank {state.process_index})"):
            _run_chunk(data, span, compute, work, dev, run_id, max_pixels)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        return _finish(work, out, data, run, stage, fingerprint, settings, run_id, rows_per_input, finalize,
                       state.num_processes, t0)
    except BaseException as err:
        if state.is_main_process:
            _mark_failed(work, err)
        raise


def _broadcast(state: Any, decide: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Rank 0 decides (errors become ``{"error": ...}``); every rank gets the same answer."""
    from accelerate.utils import broadcast_object_list

    answer: list[Any] = [None]
    if state.is_main_process:
        try:
            answer[0] = decide()
        except OutputDirError as err:
            answer[0] = {"error": str(err)}
    if state.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    return answer[0]


def _open_run(out: Path, fingerprint: str, stage: str, run: RunConfig) -> dict[str, Any]:
    """Rank 0: reuse a finished folder, or lock and (re)open the work folder for this fingerprint."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        meta = read_json(out / RUN_FILE) or {}
        if meta.get("fingerprint") == fingerprint and meta.get("status") == "finished":
            logger.info("%s: %s already holds this finished run; reusing it", stage, out)
            return {"reused": True}
        if not run.overwrite:
            what = "a different run" if meta else "other files"
            raise OutputDirError(f"output folder {str(out)!r} holds {what}; pass --overwrite to replace it "
                                 "or choose another --out")
    work = partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    acquire_lock(work)
    meta = read_json(work / RUN_FILE) or {}
    if meta.get("fingerprint") != fingerprint and any((work / CHUNKS_DIR).glob("chunk-*.json")):
        if not run.overwrite:
            release_lock(work)
            raise OutputDirError(f"{str(work)!r} holds an unfinished run with different settings or input; "
                                 "pass --overwrite to discard it or choose another --out")
        shutil.rmtree(work / CHUNKS_DIR)
    (work / CHUNKS_DIR).mkdir(exist_ok=True)
    write_json(work / RUN_FILE, {"fingerprint": fingerprint, "stage": stage, "status": "running",
                                 "source": run.source, "started": _now()})
    return {"work": str(work), "run_id": os.urandom(8).hex()}


def _run_chunk(data: Dataset, span: tuple[int, int, int], compute: ChunkFn, work: Path, device: str,
               run_id: str, max_pixels: int) -> None:
    """Compute one chunk; write its parquet (image bytes embedded, unreadable cells null), then its JSON done-marker."""
    index, start, stop = span
    t0 = time.perf_counter()
    rows = data.select(range(start, stop)).flatten_indices(keep_in_memory=True)
    result, statuses = compute(rows, device)
    t1 = time.perf_counter()
    path = chunk_path(work, index, ".parquet")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    images = write_parquet(decoding(result), tmp, max_pixels)
    if images:
        statuses = {**statuses, IMAGES_STATUS: images}
    os.replace(tmp, path)
    write_json(chunk_path(work, index, ".json"), {
        "chunk": index, "run_id": run_id, "start": start, "stop": stop, "rows_in": stop - start,
        "rows_out": len(result), "statuses": statuses,
        "seconds": {"compute": round(t1 - t0, 3), "write": round(time.perf_counter() - t1, 3)},
    })


def _finish(work: Path, out: Path, data: Dataset, run: RunConfig, stage: str, fingerprint: str,
            settings: Mapping[str, Any], run_id: str, rows_per_input: int,
            finalize: Finalize | None, world: int,
            t0: float) -> RunSummary:
    """Rank 0: merge, check counts, finalize, write ``run.json`` and rename the work folder into place."""
    n_chunks = -(-len(data) // run.chunk_size)
    files, rows_out, markers = merge_chunks(work, n_chunks)
    if rows_out != len(data) * rows_per_input:
        raise RuntimeError(f"{stage}: {len(data)} rows x {rows_per_input} should give "
                           f"{len(data) * rows_per_input} rows, got {rows_out}")
    computed = sum(m.get("run_id") == run_id for m in markers)
    summary = RunSummary(stage, out, len(data), rows_out, _sum_statuses(markers), computed,
                         len(markers) - computed, 0.0, [os.path.relpath(f, work) for f in files], fingerprint)
    extra = dict(finalize(work, load_run(work), summary) or {}) if finalize else {}
    summary.seconds = time.perf_counter() - t0
    meta = read_json(work / RUN_FILE) or {}
    write_json(work / RUN_FILE, {
        **meta, "fingerprint": fingerprint, "stage": stage, "status": "finished", "finished": _now(),
        "source": run.source, "rows_in": len(data), "rows_out": rows_out, "chunk_size": run.chunk_size,
        "num_processes": world, "settings": dict(settings), "statuses": summary.statuses,
        "versions": library_versions(), "files": summary.files,
        "timings": {"wall_seconds_last_run": round(summary.seconds, 3),
                    "chunk_seconds": {m["chunk"]: m["seconds"] for m in markers},
                    "chunks_computed_last_run": computed, "chunks_reused_last_run": len(markers) - computed},
        **extra,
    })
    shutil.rmtree(work / CHUNKS_DIR)
    release_lock(work)
    replace_dir(work, out)
    return summary


def _reused_summary(out: Path, stage: str) -> RunSummary:
    meta = read_json(out / RUN_FILE) or {}
    return RunSummary(stage, out, meta.get("rows_in", 0), meta.get("rows_out", 0), meta.get("statuses", {}),
                      0, -(-meta.get("rows_in", 0) // max(1, meta.get("chunk_size", 1))), 0.0,
                      list(meta.get("files", [])), meta.get("fingerprint", ""))


def _mark_failed(work: Path, err: BaseException) -> None:
    """Record the failure in the work folder's ``run.json`` and free the lock; chunks stay for a resume."""
    meta = read_json(work / RUN_FILE) or {}
    if meta:
        write_json(work / RUN_FILE, {**meta, "status": "failed", "error": f"{type(err).__name__}: {err}",
                                     "failed": _now()})
    release_lock(work)


def _sum_statuses(markers: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for marker in markers:
        for stage, counts in marker["statuses"].items():
            merged = total.setdefault(stage, {})
            for key, value in counts.items():
                merged[key] = merged.get(key, 0) + value
    return {stage: dict(sorted(counts.items(), key=lambda kv: -kv[1])) for stage, counts in total.items()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_fingerprint(data: Dataset, stage: str, settings: Mapping[str, Any], chunk_size: int,
                    rows_per_input: int) -> str:
    """A hash of what decides every chunk's rows: stage, settings, chunking and the input's content."""
    h = hashlib.sha256(json.dumps([stage, dict(settings), chunk_size, rows_per_input], sort_keys=True,
                                  default=str).encode())
    h.update(content_fingerprint(data).encode())
    return h.hexdigest()[:20]


def content_fingerprint(data: Dataset) -> str:
    """A hash of a dataset's schema and every value (image bytes included), in row order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(data.features).encode())
    for table in data.with_format("arrow").iter(batch_size=1000):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue())
    return h.hexdigest()


# ----------------------------------------------------------------------------- locks and atomic folders


def acquire_lock(folder: Path) -> None:
    """Take ``folder``'s writer lock; a lock left by a dead process on this host is taken over.

    Raises:
        RunLockedError: when a live process (or one on another host) holds it.
    """
    path = folder / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_json(path) or {}
            if not _stale(holder):
                raise RunLockedError(
                    f"{str(folder)!r} is being written by another safetypairs process (pid {holder.get('pid')} on "
                    f"{holder.get('host')!r} since {holder.get('since')}); wait for it, or delete "
                    f"{str(path)!r} if that process is gone") from None
            logger.warning("taking over the stale lock of dead process %s in %s", holder.get("pid"), folder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        return
    raise RunLockedError(f"could not take the lock {str(path)!r}")


def _stale(holder: dict[str, Any]) -> bool:
    """A lock is stale when its process is gone (only knowable on the same host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return not holder  # an unreadable lock file is a crash mid-write
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def release_lock(folder: Path) -> None:
    """Drop ``folder``'s writer lock (if this process holds it)."""
    path = folder / LOCK_FILE
    holder = read_json(path) or {}
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing what was there, never leaving a mix."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Write a whole output folder or nothing: yields a locked temporary sibling, renamed into place on success.

    Args:
        out: the final folder.
        overwrite: replace a non-empty ``out`` (only once the new one is complete).
        inputs: input paths ``out`` must not be or contain.

    Yields:
        The temporary folder to write into.

    Raises:
        OutputDirError: when ``out`` is an input, not a folder, non-empty without ``overwrite``,
            not writable, or being written by another process.
    """
    out = Path(out)
    check_not_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace it")
    tmp = partial_dir(out)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot write next to output folder {str(out)!r}: {err.strerror or err}") from err
    acquire_lock(tmp)
    for stale in tmp.iterdir():  # leftovers of a failed earlier attempt: this folder has no resume
        if stale.name != LOCK_FILE:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    release_lock(tmp)
    replace_dir(tmp, out)


# ----------------------------------------------------------------------------- chunks, parquet and the merge


def chunk_ranges(n_rows: int, chunk_size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """The ``(chunk index, start, stop)`` of one rank: a contiguous run of global chunks, so
    chunk contents (and batches) do not depend on the number of processes."""
    n_chunks = -(-n_rows // chunk_size)
    first, last = n_chunks * rank // world, n_chunks * (rank + 1) // world
    return [(c, c * chunk_size, min(n_rows, (c + 1) * chunk_size)) for c in range(first, last)]


def chunk_path(out: Path, index: int, suffix: str) -> Path:
    """The chunk file of ``index`` (``.parquet`` data or ``.json`` done-marker)."""
    return out / CHUNKS_DIR / f"chunk-{index:06d}{suffix}"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (a killed run never leaves a half-written file under the final name)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def chunk_done(out: Path, index: int) -> bool:
    """A chunk is finished when its parquet and its JSON marker (written last) both exist."""
    return chunk_path(out, index, ".parquet").exists() and read_json(chunk_path(out, index, ".json")) is not None


def merge_chunks(out: Path, n_chunks: int) -> tuple[list[Path], int, list[dict[str, Any]]]:
    """Stream every chunk, in input order, into ``out/data/train-*.parquet``.

    Args:
        out: the run (work) folder.
        n_chunks: how many chunks the run has.

    Returns:
        The data files, the number of rows written and each chunk's JSON marker.

    Raises:
        RuntimeError: when a chunk is missing.
    """
    missing = [c for c in range(n_chunks) if not chunk_done(out, c)]
    if missing:
        raise RuntimeError(f"chunks {missing[:10]} of {n_chunks} are missing in {out / CHUNKS_DIR}")
    markers = [read_json(chunk_path(out, c, ".json")) or {} for c in range(n_chunks)]
    groups = _merge_groups([m["rows_out"] for m in markers])
    data = out / DATA_DIR
    data.mkdir(exist_ok=True)
    for stale in data.glob("*.parquet"):
        stale.unlink()
    files, rows_out = [], 0
    for k, group in enumerate(groups):
        path = data / f"train-{k:05d}-of-{len(groups):05d}.parquet"
        rows_out += _concat_parquet([chunk_path(out, c, ".parquet") for c in group], path)
        files.append(path)
    return files, rows_out, markers


def _merge_groups(rows_per_chunk: list[int]) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    total = 0
    for chunk, rows in enumerate(rows_per_chunk):
        if groups[-1] and total + rows > MERGE_ROWS:
            groups.append([])
            total = 0
        groups[-1].append(chunk)
        total += rows
    return groups


def _concat_parquet(sources: list[Path], path: Path) -> int:
    """Concatenate parquet files (same schema) row group by row group into ``path``; returns rows."""
    schema = pq.read_schema(sources[0])
    rows = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, schema=schema) as writer:
        for source in sources:
            parquet = pq.ParquetFile(source)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                writer.write_table(table.cast(schema))
                rows += table.num_rows
    os.replace(tmp, path)
    return rows


def decoding(dataset: Dataset) -> Dataset:
    """Image columns back to decoding ``Image()``, so the written parquet loads as images."""
    features = dataset.features.copy()
    for name, feature in features.items():
        if isinstance(feature, Image) and not feature.decode:
            features[name] = Image()
    return dataset.cast(features) if features != dataset.features else dataset


def write_parquet(dataset: Dataset, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, int]:
    """Write one parquet file with image bytes embedded, in row groups of `ROW_GROUP_SIZE` (flat memory).

    Every image cell is checked first (`images.reencoded`), so what is written always decodes with
    `datasets`' default decoding: a cell that cannot be decoded within ``max_pixels`` becomes null
    (its bytes are not carried on; a warning names the row, the column and the cause), and one that
    only fits reduced is stored reduced, as PNG.

    Args:
        dataset: the rows; its features (Image, ClassLabel) go into the schema metadata.
        path: the file to write.
        max_pixels: the pixel cap of a kept image cell.

    Returns:
        How many image cells were nulled or reduced, keyed ``"<column>: <unreadable|too_large|reduced>"``.
    """
    schema = dataset.features.arrow_schema
    images = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
    counts: dict[str, int] = {}
    with pq.ParquetWriter(path, schema=schema) as writer:
        for table in dataset.with_format("arrow").iter(batch_size=ROW_GROUP_SIZE):
            for name in images:
                table = _checked_images(table, name, max_pixels, counts)
            writer.write_table(embed_table_storage(table).cast(schema), row_group_size=ROW_GROUP_SIZE)
    return counts


def _checked_images(table: pa.Table, name: str, max_pixels: int, counts: dict[str, int]) -> pa.Table:
    """``table`` with the image column ``name`` checked cell by cell: unreadable -> null, oversized -> reduced."""
    cells = table.column(name).to_pylist()
    ids = next((table.column(c).to_pylist() for c in ("source_id", "pair_id") if c in table.column_names), None)
    changed = False
    for i, cell in enumerate(cells):
        if cell is None or (cell.get("bytes") is None and cell.get("path") is None):
            continue
        try:
            smaller = reencoded(cell, max_pixels)
        except ImageError as err:
            row = repr(ids[i]) if ids else f"#{i} of its row group"
            logger.warning("row %s: column %r: %s; the cell is stored as null", row, name, err)
            cells[i], outcome = None, err.status
        else:
            if smaller is None:
                continue
            cells[i], outcome = {"bytes": smaller, "path": None}, "reduced"
        changed = True
        counts[f"{name}: {outcome}"] = counts.get(f"{name}: {outcome}", 0) + 1
    if not changed:
        return table
    index = table.column_names.index(name)
    return table.set_column(index, table.schema.field(index), pa.array(cells, type=table.schema.field(index).type))


def shards(dataset: Dataset, max_shard_size: int | str) -> Iterator[tuple[int, int, Dataset]]:
    """Contiguous shards of at most ~``max_shard_size`` bytes (of the rows' arrow data)."""
    nbytes = sum(table.nbytes for table in dataset.with_format("arrow").iter(batch_size=1000))
    n = max(1, int(nbytes / convert_file_size_to_int(max_shard_size)) + 1)
    n = min(n, max(1, len(dataset)))
    for index in range(n):
        yield index, n, dataset.shard(num_shards=n, index=index, contiguous=True)


def data_files(out_dir: Path, config_name: str, split: str) -> list[Path]:
    """The parquet shards of one config and split in a release folder, sorted."""
    return sorted((out_dir / "data" / config_name).glob(f"{split}-*.parquet"))


# ----------------------------------------------------------------------------- reading what runs wrote


def load_run(out: str | Path) -> Dataset:
    """Load the merged rows of a finished run (``out/data/*.parquet``) as one `datasets.Dataset`.

    Raises:
        FileNotFoundError: when the run has no merged data (unfinished, or not a run folder) or a data
            file its ``run.json`` lists is missing.
        ValueError: when a data file is corrupt (named).
    """
    listed = [str(Path(out) / f) for f in (read_json(Path(out) / RUN_FILE) or {}).get("files", [])]
    missing = [f for f in listed if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"data file {missing[0]!r} of the run {str(out)!r} is missing ({len(missing)} of "
                                f"{len(listed)} listed in {RUN_FILE})")
    found = sorted(str(p) for p in (Path(out) / DATA_DIR).glob("train-*.parquet"))
    if not found:
        hint = f"; an unfinished run resumes from {str(partial_dir(Path(out)))!r}" if partial_dir(Path(out)).is_dir() else ""
        raise FileNotFoundError(f"no merged data in {str(Path(out) / DATA_DIR)!r}; has the run finished?{hint}")
    return load_checked("parquet", data_files=found, split="train")


def load_checked(path: str, *args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset` on local input, with a corrupt file reported as one error naming it.

    Args:
        path, *args, **kwargs: as for `datasets.load_dataset` (``data_files`` or a local folder give
            the parquet files checked).

    Returns:
        What `datasets.load_dataset` returns.

    Raises:
        ValueError: naming a corrupt or unreadable parquet file, or saying what could not be read.
        FileNotFoundError: when there are no data files.
    """
    from datasets.exceptions import DatasetGenerationError

    if Path(path).is_dir() and "data_dir" not in kwargs and "data_files" not in kwargs:
        # a local folder by its own files: `datasets` caches a folder under its base name and config alone,
        # so two folders named alike (two runs' "release/") would give the first one's rows
        name = args[0] if args else kwargs.pop("name", None)
        path, args, kwargs = "parquet", (), {**kwargs, "data_files": local_data_files(Path(path), name)}
    files = kwargs.get("data_files") or []
    if isinstance(files, dict):
        files = [f for split_files in files.values() for f in split_files]
    files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    for file in files:  # footers first: a truncated or foreign file fails here, cheaply, named
        _check_parquet(file, footer_only=True)
    try:
        return load_dataset(path, *args, **kwargs)
    except DatasetGenerationError as err:
        for file in files:  # name the file whose data cannot be read
            _check_parquet(file, footer_only=False)
        cause = err.__cause__ or err
        raise ValueError(f"cannot read {path!r}: {type(cause).__name__}: {cause}") from None


def local_data_files(folder: Path, name: str | None = None) -> dict[str, list[str]]:
    """The parquet files of one config of a local folder, by split, as `datasets` would resolve them.

    The README's YAML ``configs`` decide (``name``, else the ``default: true`` config, else the first);
    without them every ``*.parquet`` below the folder, split by a ``<split>-`` file-name prefix
    (``train`` when there is none).

    Raises:
        ValueError: for a config the README does not declare.
        FileNotFoundError: when the folder holds no parquet file.
    """
    configs = _readme_configs(folder)
    if configs:
        chosen = next((c for c in configs if c.get("config_name") == name), None) if name else \
            next((c for c in configs if c.get("default")), configs[0])
        if chosen is None:
            raise ValueError(f"{str(folder)!r} has no config {name!r}; it declares "
                             f"{', '.join(str(c.get('config_name')) for c in configs)}")
        declared = chosen.get("data_files") or []
        if isinstance(declared, str):
            declared = [{"split": "train", "path": declared}]
        found = {entry["split"]: sorted(str(f) for pattern in ([entry["path"]] if isinstance(entry["path"], str)
                                                                else entry["path"]) for f in folder.glob(pattern))
                 for entry in declared}
    else:
        found = {}
        for file in sorted(folder.rglob("*.parquet")):
            prefix = file.name.split("-", 1)[0] if "-" in file.name else "train"
            found.setdefault(prefix if prefix.isidentifier() else "train", []).append(str(file))
    found = {split: files for split, files in found.items() if files}
    if not found:
        raise FileNotFoundError(f"{str(folder)!r} holds no parquet files" + (f" for config {name!r}" if name else ""))
    return found


def _readme_configs(folder: Path) -> list[dict[str, Any]]:
    """The ``configs`` list of a folder's README.md YAML header (empty without one)."""
    import yaml

    readme = folder / "README.md"
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return []
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    try:
        configs = (yaml.safe_load(header) or {}).get("configs") or []
    except yaml.YAMLError as err:
        raise ValueError(f"unreadable YAML header in {str(readme)!r}: {err}") from None
    return [c for c in configs if isinstance(c, dict)]


def _check_parquet(file: str, footer_only: bool) -> None:
    try:
        if footer_only:
            pq.read_metadata(file)
            return
        for _ in pq.ParquetFile(file).iter_batches(batch_size=ROW_GROUP_SIZE):
            pass
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"corrupt or truncated parquet file {file!r}: {err}") from None


def load_saved(path: str | Path) -> Any:
    """`datasets.load_from_disk`, with an incomplete or corrupt folder reported as one error naming it.

    Raises:
        ValueError: when the folder cannot be read.
    """
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except (KeyError, IndexError, TypeError, ValueError, pa.ArrowException) as err:  # what a broken state.json,
        raise ValueError(f"cannot read the save_to_disk folder {str(path)!r}; it is empty, incomplete or corrupt "
                         f"({type(err).__name__}: {err})") from None  # a missing or bad .arrow file raise


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return any((Path(path) / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json"))


def read_rows(path: str | Path) -> Dataset:
    """Read the rows a stage wrote, whatever the writer.

    Args:
        path: a run folder (``run.json`` + ``data/*.parquet``), a folder written by
            `Dataset.save_to_disk`, or a folder of parquet files / a hub layout (all splits are
            concatenated).

    Returns:
        The rows.

    Raises:
        FileNotFoundError: if ``path`` is not a folder or holds none of these.
        ValueError: if a data file is corrupt (named).
    """
    from datasets import DatasetDict, concatenate_datasets

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"input {str(root)!r} is not a folder")
    if (root / RUN_FILE).is_file():
        return load_run(root)
    if is_saved_dataset(root):
        loaded = load_saved(root)
    elif (root / "README.md").is_file() or any(root.rglob("*.parquet")):
        loaded = load_checked(str(root))
    else:
        raise FileNotFoundError(f"{str(root)!r} holds no run, save_to_disk dataset or parquet files")
    return concatenate_datasets(list(loaded.values())) if isinstance(loaded, DatasetDict) else loaded


def model_info(spec: str) -> dict[str, Any]:
    """Model id and revision behind an ``hf-vlm:`` or ``diffusers:`` spec (local path or hub cache commit)."""
    from huggingface_hub import try_to_load_from_cache

    arg = spec.partition(":")[2].partition(",")[0]
    if not arg or spec.partition(":")[0] not in ("hf-vlm", "diffusers", "llavaguard", "shieldgemma2"):
        return {"spec": spec}
    if os.path.isdir(arg):
        return {"spec": spec, "model": os.path.abspath(arg), "revision": "local"}
    for name in ("model_index.json", "config.json"):
        cached = try_to_load_from_cache(arg, name)
        if isinstance(cached, str):  # .../snapshots/<commit>/<name>
            return {"spec": spec, "model": arg, "revision": Path(cached).parent.name}
    return {"spec": spec, "model": arg, "revision": None}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a run's output."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("safetypairs", "torch", "diffusers", "transformers", "datasets", "accelerate", "pillow",
                 "opencv-python-headless", "rapidocr", "open_clip_torch", "lpips"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
