"""The one run folder every sharded stage writes: fingerprint, chunks, rank shards, lock, resume, merge, ``run.json``."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from safetypairs.engine.chunks import (
    CHUNKS_DIR,
    Claims,
    chunk_done,
    chunk_path,
    chunk_spans,
    merge_chunks,
    open_claims,
)
from safetypairs.engine.datafiles import (
    IMAGES_STATUS,
    RUN_FILE,
    DataFiles,
    write_parquet,
)
from safetypairs.engine.folders import (
    OutputDirError,
    acquire_lock,
    check_not_input,
    finish_partial,
    open_partial,
    output_folder,
    read_json,
    release_lock,
    utc_now,
    write_json,
)
from safetypairs.images import DEFAULT_MAX_PIXELS
from safetypairs.usage import Usage, merge_usage
from safetypairs.utils import datasets_progress, device_for_rank, progress

logger = logging.getLogger(__name__)

# how long a collective (rank 0's answer when a run opens, `main_process_first`) waits on rank 0's serial steps; the
# chunks are not waited on through collectives but by polling their files (`_wait_for_chunks`)
BARRIER_TIMEOUT = timedelta(hours=float(os.environ.get("SAFETYPAIRS_BARRIER_TIMEOUT_HOURS", "6")))
# a rank that waits for chunks other ranks hold gives up when none has finished for STALL_FACTOR times the slowest
# chunk seen (select + compute + write), and at least STALL_MINUTES
STALL_MINUTES = float(os.environ.get("SAFETYPAIRS_STALL_MINUTES", "10"))
STALL_FACTOR = 4

# compute(chunk rows, device) -> (output rows, {stage name: status histogram})
ChunkFn = Callable[[Dataset, str], "tuple[Dataset, dict[str, dict[str, Any]]]"]
# finalize(work folder, merged data files, summary) -> extra run.json fields (rank 0, before the folder moves into
# place); the hook reads the rows (`DataFiles.rows`) only if it needs them
Finalize = Callable[[Path, DataFiles, "RunSummary"], "Mapping[str, Any] | None"]
# usage() -> a snapshot (new objects) of what each served backend of this process has sent and got so far, by
# (kind, spec) (`backends.registry.usage_counts`); the runner keeps each chunk's difference
UsageFn = Callable[[], "Mapping[tuple[str, str], Usage]"]
C = TypeVar("C")


@dataclass(frozen=True)
class Passes:
    """Compute every chunk in several passes, one pass over all of a rank's chunks before the next.

    Evaluate runs one guard per pass (guard-major), so only one guard's model is in memory at a time. Each
    (pass, chunk) piece is written and resumed on its own; when every pass is done a chunk's rows are its pieces
    side by side (a column two pieces share, like the label, is taken from the first).

    Attributes:
        names: the passes, in order (recorded nowhere: they must not change a chunk's rows).
        compute: ``(chunk rows, device, pass name) -> (output rows, {stage: status histogram})``.
        after: called with a pass's name when this rank finished it (free its model).
    """

    names: tuple[str, ...]
    compute: Callable[[Dataset, str, str], "tuple[Dataset, dict[str, dict[str, Any]]]"]
    after: Callable[[str], None]


@dataclass(frozen=True)
class RunConfig:
    """Where and how a sharded run writes.

    Args:
        out: the run folder (a symbolic link to a folder is written through). It appears whole when the run
            finishes; until then the work lives in the sibling ``<out>.partial/`` (chunks, ``run.json``, the
            lock, the project's marker), where a restarted run resumes; a ``<out>.partial`` without the marker
            is someone else's and is refused, untouched.
        chunk_size: input rows per chunk (the unit of resumption and of rank work).
        source: how the input was named (recorded in ``run.json``).
        overwrite: replace a finished ``out`` that holds a different run or other files.
        inputs: what the run reads; ``out`` must not be, contain or lie inside one that is a local path
            (checked here, once, before anything is read or written).

    Raises:
        ValueError: for a chunk size below 1.
        OutputDirError: when ``out`` is, contains or lies inside a local input.
    """

    out: str | Path
    chunk_size: int = 64
    source: str = ""
    overwrite: bool = False
    inputs: tuple[str | Path, ...] = ()

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.inputs:
            check_not_input(self.out, tuple(path for path in self.inputs if Path(path).exists()))

    def reading(self, path: str | Path) -> RunConfig:
        """This run reading ``path``: its source when it names none, and one of its checked inputs.

        Returns:
            ``self`` when it already reads ``path`` (nothing is checked again), else a checked copy.

        Raises:
            OutputDirError: when ``out`` is, contains or lies inside ``path``.
        """
        if self.source and str(path) in map(str, self.inputs):
            return self
        return replace(self, source=self.source or str(path), inputs=(*self.inputs, path))


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
    usage: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def render(self) -> str:
        """A short plain-text summary for the terminal."""
        lines = [f"{self.stage}: {self.rows_in} rows in, {self.rows_out} out  chunks: {self.chunks_computed} "
                 f"computed, {self.chunks_reused} reused  ({self.seconds:.1f} s)"]
        for stage, counts in self.statuses.items():
            lines.append(f"  {stage:<9} " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        for kind, served in self.usage.items():
            for spec, u in served.items():
                lines.append(f"  {kind} {spec}: {u['requests']} requests ({u['retries']} retries), {u['cache_hits']} "
                             f"cache hits, {u['prompt_tokens']}+{u['completion_tokens']} tokens, latency p50/p90/p99 "
                             f"{u['latency_p50_s']}/{u['latency_p90_s']}/{u['latency_p99_s']} s")
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


def for_rank(config: C, device: str) -> C:
    """A stage config for one rank's chunks: ``device`` set and ``num_proc`` (when it has one) ``None``, since the
    launched processes share the work, not `Dataset.map` processes.

    The copy does not run the config's checks again (option parsing, policy files): it passed them when it
    was made, once per run, and neither field changes what they check.

    Args:
        config: a checked frozen stage config dataclass with a ``device`` field.
        device: the rank's torch device.

    Returns:
        The copy.
    """
    copied = copy.copy(config)
    object.__setattr__(copied, "device", device)
    if hasattr(copied, "num_proc"):
        object.__setattr__(copied, "num_proc", None)
    return copied


def run_stage(data: Dataset, compute: ChunkFn | Passes, *, stage: str, settings: Mapping[str, Any], run: RunConfig,
              device: str = "auto", rows_per_input: int = 1,
              finalize: Finalize | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
              keep: tuple[str, ...] = (), usage: UsageFn | None = None) -> RunSummary | None:
    """Run ``compute`` over ``data`` in fixed-size chunks, sharded over the launched processes, resumable.

    Under ``accelerate launch`` / ``torchrun`` the ranks claim fixed global chunks as they go (`chunks.Claims`: a
    rank that is done takes the next unclaimed chunk, so a slow rank computes fewer; chunk contents do not depend on
    the number of processes), write each finished chunk atomically (parquet with image bytes + a JSON marker) and
    skip chunks an interrupted run finished. Rank 0 holds the folder's lock, checks the settings fingerprint before
    any rank starts, waits (polling the chunk files, `_wait_for_chunks`) until every chunk is written, merges the
    chunks in input order, calls ``finalize``, and renames the work folder into place.

    Args:
        data: the input rows.
        compute: ``(chunk rows, device) -> (output rows, {stage: status histogram})``, or `Passes` that compute
            each chunk in pieces, pass by pass.
        stage: the stage name (run.json, progress bar).
        settings: everything that decides the output rows (hashed into the fingerprint, recorded).
        run: the folder, chunk size and overwrite policy (its inputs were checked when it was made).
        device: ``"auto"`` (the rank's GPU when present) or a torch device string.
        rows_per_input: output rows per input row (checked at the merge).
        finalize: rank 0's hook ``(work folder, merged data files, summary) -> extra run.json fields``, run
            before the folder is renamed into place (write reports there); it reads the rows only if it
            needs them (`DataFiles.rows`).
        max_pixels: the pixel cap of the image cells the chunks keep (see `write_parquet`).
        keep: names of files that work beside the data made in a finished ``out`` (human review
            decisions): when ``run.overwrite`` replaces that folder they carry into the new one, with a warning.
        usage: reads the counters of the served backends (`backends.registry.usage_counts`); each chunk's
            marker keeps what its compute sent and got, and rank 0 sums every chunk of every rank into
            ``run.json``'s ``usage`` (``{kind: {spec: Usage.as_dict()}}``) and the summary's.

    Returns:
        The summary on rank 0 (also for a finished folder that is reused without computing);
        ``None`` on the other ranks.

    Raises:
        ValueError: for empty input.
        OutputDirError: when ``out`` is unusable, locked by a live process or holds another run.
        RuntimeError: when chunks are missing at merge time, rows out != rows in x rows_per_input, or the ranks
            stall (no chunk finished for the stall window while chunks are still claimed: a rank died or hangs).
    """
    if not len(data):
        raise ValueError(f"{stage}: the input has no rows; nothing to do")
    t0 = time.perf_counter()
    out = output_folder(run.out)
    state = process_state(device)
    # only rank 0 opens and finishes the folder: the other ranks skip hashing every input byte
    t1 = time.perf_counter()
    fingerprint = (run_fingerprint(data, stage, settings, run.chunk_size, rows_per_input)
                   if state.is_main_process else "")
    steps = {"fingerprint": round(time.perf_counter() - t1, 3)}
    opened = _broadcast(state, lambda: _open_run(out, fingerprint, stage, run))
    if "error" in opened:
        raise OutputDirError(opened["error"])
    if opened.get("reused"):
        return _reused_summary(out, stage) if state.is_main_process else None
    work, run_id = Path(opened["work"]), opened["run_id"]
    try:
        spans = chunk_spans(len(data), run.chunk_size)
        todo = [span for span in spans if not chunk_done(work, span[0])]
        claims = Claims(work, run_id, state.process_index)
        dev = device_for_rank(device, state.local_process_index)
        logger.info("%s rank %d/%d on %s: %d chunk(s) to share, %d already done", stage, state.process_index,
                    state.num_processes, dev, len(todo), len(spans) - len(todo))
        with datasets_progress(False):  # one bar per stage and rank: the chunks', none of `datasets`' inside them
            if isinstance(compute, Passes):
                _run_passes(data, todo, compute, work, dev, claims, max_pixels, usage, stage)
            else:
                for span in progress(todo, desc=f"{stage} (rank {state.process_index})"):
                    if claims.take(span[0]):
                        _run_chunk(data, span, compute, work, dev, run_id, max_pixels, usage)
            join = _joiner(claims, len(compute.names), max_pixels) if isinstance(compute, Passes) else None
            _wait_for_chunks(work, todo, claims, stage, join)
        if not state.is_main_process:
            return None
        summary = _finish(work, out, data, run, stage, fingerprint, settings, claims, rows_per_input, finalize,
                          state.num_processes, t0, steps)
        _move_into_place(work, out, stage, keep)
        return summary
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
    work = open_partial(out)
    acquire_lock(work)
    meta = read_json(work / RUN_FILE) or {}
    if meta.get("fingerprint") != fingerprint and any((work / CHUNKS_DIR).glob("chunk-*.json")):
        if not run.overwrite:
            release_lock(work)
            raise OutputDirError(f"{str(work)!r} holds an unfinished run with different settings or input; "
                                 "pass --overwrite to discard it or choose another --out")
        shutil.rmtree(work / CHUNKS_DIR)
    (work / CHUNKS_DIR).mkdir(exist_ok=True)
    run_id = os.urandom(8).hex()
    open_claims(work, run_id)
    write_json(work / RUN_FILE, {"fingerprint": fingerprint, "stage": stage, "status": "running",
                                 "source": run.source, "started": utc_now()})
    return {"work": str(work), "run_id": run_id}


def _run_chunk(data: Dataset, span: tuple[int, int, int], compute: ChunkFn, work: Path, device: str,
               run_id: str, max_pixels: int, usage: UsageFn | None, piece: str = "") -> None:
    """Compute one chunk (or one pass's ``piece`` of it); write its parquet (image bytes embedded, unreadable cells
    null, every kept cell recorded in ``image_checks``), then its JSON done-marker with the seconds each step took
    and what the served backends sent and got for it."""
    index, start, stop = span
    t0 = time.perf_counter()
    rows = data.select(range(start, stop)).flatten_indices(keep_in_memory=True)
    t1 = time.perf_counter()
    before = usage() if usage else {}
    result, statuses = compute(rows, device)
    spent = _usage_since(before, usage() if usage else {})
    seconds = {"select": round(t1 - t0, 3), "compute": round(time.perf_counter() - t1, 3)}
    _write_chunk(work, span, result, {"run_id": run_id, "statuses": statuses, "usage": spent, "seconds": seconds},
                 max_pixels, piece)


def _write_chunk(work: Path, span: tuple[int, int, int], result: Dataset, marker: dict[str, Any], max_pixels: int,
                 piece: str = "") -> None:
    """Write a chunk's (or piece's) parquet atomically, then its done-marker (``marker`` plus counts and the
    seconds of the write)."""
    index, start, stop = span
    t0 = time.perf_counter()
    path = chunk_path(work, index, f"{piece}.parquet")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    images = write_parquet(result, tmp, max_pixels, record=True)
    statuses = {**marker["statuses"], IMAGES_STATUS: images} if images else marker["statuses"]
    os.replace(tmp, path)
    write_json(chunk_path(work, index, f"{piece}.json"), {
        "chunk": index, "start": start, "stop": stop, "rows_in": stop - start, "rows_out": len(result),
        **marker, "statuses": statuses,
        "seconds": {**marker["seconds"], "write": round(time.perf_counter() - t0, 3)},
    })


def _piece(k: int) -> str:
    return f".pass-{k:03d}"


def _run_passes(data: Dataset, todo: list[tuple[int, int, int]], passes: Passes, work: Path, device: str,
                claims: Claims, max_pixels: int, usage: UsageFn | None, stage: str) -> None:
    """Every pass over the chunks in ``todo``: this rank computes the pieces it claims, skipping those an
    interrupted run finished, and goes on to the next pass once no piece of this one is left to claim."""
    for k, name in enumerate(passes.names):
        left = [span for span in todo if not chunk_done(work, span[0], _piece(k))]
        logger.info("%s pass %d/%d (%s): %d chunk(s) to share, %d already done", stage, k + 1, len(passes.names),
                    name, len(left), len(todo) - len(left))
        def one(rows: Dataset, dev: str, name: str = name) -> tuple[Dataset, dict[str, dict[str, Any]]]:
            return passes.compute(rows, dev, name)

        for span in progress(left, desc=f"{stage} {name}"):
            if claims.take(span[0], _piece(k)):
                _run_chunk(data, span, one, work, device, claims.run_id, max_pixels, usage, _piece(k))
        passes.after(name)


def _joiner(claims: Claims, n_passes: int, max_pixels: int) -> Callable[[tuple[int, int, int]], None]:
    """``join(span)``: join a chunk of `Passes` whose pieces are all written, when this rank claims it first."""
    def join(span: tuple[int, int, int]) -> None:
        if all(chunk_done(claims.work, span[0], _piece(k)) for k in range(n_passes)) and claims.take(span[0]):
            _join_pieces(claims.work, span, n_passes, claims.run_id, max_pixels)
    return join


def _wait_for_chunks(work: Path, todo: list[tuple[int, int, int]], claims: Claims, stage: str,
                     join: Callable[[tuple[int, int, int]], None] | None = None) -> None:
    """Wait, polling the chunk files, until every chunk of ``todo`` is written (by any rank).

    Waiting scales with the work, not with a fixed timeout: each chunk or piece that finishes is progress, and the
    ranks stall only when none has finished for the window of what is still running (`_stall_window`).

    Args:
        work: the run's work folder.
        todo: the chunks this attempt computes.
        claims: this rank's claims (what runs, and who runs it, are the claims without a done-marker).
        stage: the stage name (error message).
        join: for `Passes` (`_joiner`): joins a chunk whose pieces are all written, if this rank claims it first.

    Raises:
        RuntimeError: naming what runs, who claimed it and since when, when the ranks stall.
    """
    seen = _finished_seconds(work, {})
    last, pause = time.monotonic(), 0.02
    pending = [span for span in todo if not chunk_done(work, span[0])]
    while pending:
        if join is not None:
            for span in pending:
                join(span)
        pending = [span for span in pending if not chunk_done(work, span[0])]
        if not pending:
            return
        now = _finished_seconds(work, seen)
        if len(now) > len(seen):
            seen, last, pause = now, time.monotonic(), 0.02
        else:
            running = [path for path in claims.held() if path.name not in seen]
            window = _stall_window(running, seen)
            if window is not None and time.monotonic() - last > window:
                raise RuntimeError(
                    f"{stage}: nothing finished for {window:.0f} s ({STALL_FACTOR} x the slowest finished chunk of "
                    f"the kind running, at least SAFETYPAIRS_STALL_MINUTES={STALL_MINUTES:g}) while {len(pending)} "
                    f"chunk(s) are unfinished ({_holders(running)}): a rank died or hangs; run the command again to "
                    "resume (finished chunks are kept)")
        time.sleep(pause)
        # polls back off to 2 s, or to a tenth of the slowest chunk seen: a short chunk is noticed soon after it ends
        pause = min(2 * pause, max(0.02, max(seen.values()) / 10) if seen else 2.0, 2.0)


def _kind(marker: str) -> str:
    """What a marker (or claim) file is of: ``""`` for a whole chunk, the piece (``.pass-001``) for a pass's."""
    piece = marker.removesuffix(".json").partition(".")[2]
    return f".{piece}" if piece else ""


def _stall_window(running: list[Path], seen: Mapping[str, float]) -> float | None:
    """How long the waiting ranks wait for the next chunk or piece to finish: `STALL_FACTOR` times the slowest
    finished one of each kind that runs (whole chunks; each pass's pieces), at least `STALL_MINUTES`; ``None`` (no
    limit) while a kind that runs has none finished, since nothing yet says how long one takes."""
    slowest: dict[str, float] = {}
    for name, seconds in seen.items():
        slowest[_kind(name)] = max(slowest.get(_kind(name), 0.0), seconds)
    kinds = {_kind(path.name) for path in running}
    if not kinds or not kinds <= slowest.keys():
        return None
    return max(STALL_MINUTES * 60, STALL_FACTOR * max(slowest[kind] for kind in kinds))


def _holders(running: list[Path]) -> str:
    """Who holds the first claims still running, for the stall error."""
    found = []
    for path in running[:5]:
        owner = read_json(path) or {}
        found.append(f"{path.stem}: rank {owner.get('rank')} (pid {owner.get('pid')} on {owner.get('host')!r}) "
                     f"since {owner.get('since')}")
    return "; ".join(found) + ("; ..." if len(running) > 5 else "")


def _finished_seconds(work: Path, known: dict[str, float]) -> dict[str, float]:
    """``known`` plus the seconds (select + compute + write) of every chunk or piece marker written since."""
    found = dict(known)
    for path in (work / CHUNKS_DIR).glob("chunk-*.json"):
        if path.name not in found:
            marker = read_json(path)
            if marker is not None:
                found[path.name] = float(sum(marker.get("seconds", {}).values()))
    return found


def _join_pieces(work: Path, span: tuple[int, int, int], n_passes: int, run_id: str, max_pixels: int) -> None:
    """A chunk made of its pieces side by side: the statuses, usage and seconds of every piece added up.

    Raises:
        RuntimeError: when the pieces hold different numbers of rows.
    """
    from datasets import concatenate_datasets

    index = span[0]
    markers = [read_json(chunk_path(work, index, f"{_piece(k)}.json")) or {} for k in range(n_passes)]
    joined: Dataset | None = None
    for k in range(n_passes):
        piece = Dataset(pq.read_table(chunk_path(work, index, f"{_piece(k)}.parquet")))
        if joined is not None and len(piece) != len(joined):
            raise RuntimeError(f"chunk {index}: pass {k} gave {len(piece)} rows, pass 0 gave {len(joined)}")
        new = [c for c in piece.column_names if joined is None or c not in joined.column_names]
        piece = piece.select_columns(new)
        joined = piece if joined is None else concatenate_datasets([joined, piece], axis=1)
    seconds = {step: round(sum(m["seconds"].get(step, 0) for m in markers), 3) for step in ("select", "compute")}
    _write_chunk(work, span, joined, {"run_id": run_id, "statuses": _sum_statuses(markers),
                                      "usage": _usage_records(markers), "seconds": seconds},
                 max_pixels)


def _usage_records(markers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every usage record of ``markers`` (chunk or piece markers), in order."""
    return [record for marker in markers for record in marker.get("usage", [])]


def _usage_since(before: Mapping[tuple[str, str], Usage], after: Mapping[tuple[str, str], Usage]
                 ) -> list[dict[str, Any]]:
    """What each backend sent and got between two readings, as marker records ``{"kind", "spec", "counts"}``."""
    spent = [(key, usage - before.get(key, Usage())) for key, usage in after.items()]
    return [{"kind": kind, "spec": spec, "counts": diff.counts()} for (kind, spec), diff in spent if diff]


def _finish(work: Path, out: Path, data: Dataset, run: RunConfig, stage: str, fingerprint: str,
            settings: Mapping[str, Any], claims: Claims, rows_per_input: int,
            finalize: Finalize | None, world: int, t0: float, steps: dict[str, float]) -> RunSummary:
    """Rank 0: merge, check counts, finalize and write ``run.json`` (the folder is complete after this); its timings
    keep which rank computed each chunk (and piece) of this attempt."""
    run_id = claims.run_id
    n_chunks = -(-len(data) // run.chunk_size)
    t1 = time.perf_counter()
    files, rows_out, markers = merge_chunks(work, n_chunks)
    t2 = time.perf_counter()
    if rows_out != len(data) * rows_per_input:
        raise RuntimeError(f"{stage}: {len(data)} rows x {rows_per_input} should give "
                           f"{len(data) * rows_per_input} rows, got {rows_out}")
    computed = sum(m.get("run_id") == run_id for m in markers)
    summary = RunSummary(stage, out, len(data), rows_out, _sum_statuses(markers), computed,
                         len(markers) - computed, 0.0, [os.path.relpath(f, work) for f in files], fingerprint,
                         merge_usage(_usage_records(markers)))
    extra = dict(finalize(work, DataFiles(tuple(files)), summary) or {}) if finalize else {}
    steps = {**steps, "merge": round(t2 - t1, 3), "finalize": round(time.perf_counter() - t2, 3)}
    summary.seconds = time.perf_counter() - t0
    meta = read_json(work / RUN_FILE) or {}
    write_json(work / RUN_FILE, {
        **meta, "fingerprint": fingerprint, "stage": stage, "status": "finished", "finished": utc_now(),
        "source": run.source, "rows_in": len(data), "rows_out": rows_out, "chunk_size": run.chunk_size,
        "num_processes": world, "settings": dict(settings), "statuses": summary.statuses,
        "versions": library_versions(), "files": summary.files, "usage": summary.usage,
        "timings": {"wall_seconds_last_run": round(summary.seconds, 3), "rank0_seconds": steps,
                    "chunk_seconds": {m["chunk"]: m["seconds"] for m in markers},
                    "chunk_ranks_last_run": claims.ranks(),
                    "chunks_computed_last_run": computed, "chunks_reused_last_run": len(markers) - computed},
        **extra,
    })
    return summary


def _move_into_place(work: Path, out: Path, stage: str, keep: tuple[str, ...]) -> None:
    """Rank 0: drop the chunks, free the lock and replace ``out`` by the work folder, carrying ``keep`` files over."""
    shutil.rmtree(work / CHUNKS_DIR)
    for name in finish_partial(work, out, keep):
        logger.warning("%s: kept %s of the replaced %s in the new run folder (made there after the old run, "
                       "it is not part of the run and --overwrite does not discard it)", stage, name, out)


def _reused_summary(out: Path, stage: str) -> RunSummary:
    meta = read_json(out / RUN_FILE) or {}
    return RunSummary(stage, out, meta.get("rows_in", 0), meta.get("rows_out", 0), meta.get("statuses", {}),
                      0, -(-meta.get("rows_in", 0) // max(1, meta.get("chunk_size", 1))), 0.0,
                      list(meta.get("files", [])), meta.get("fingerprint", ""), meta.get("usage", {}))


def _mark_failed(work: Path, err: BaseException) -> None:
    """Record the failure in the work folder's ``run.json`` and free the lock; chunks stay for a resume."""
    meta = read_json(work / RUN_FILE) or {}
    if meta:
        write_json(work / RUN_FILE, {**meta, "status": "failed", "error": f"{type(err).__name__}: {err}",
                                     "failed": utc_now()})
    release_lock(work)


def _sum_statuses(markers: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for marker in markers:
        for stage, counts in marker["statuses"].items():
            merged = total.setdefault(stage, {})
            for key, value in counts.items():
                merged[key] = merged.get(key, 0) + value
    return {stage: dict(sorted(counts.items(), key=lambda kv: -kv[1])) for stage, counts in total.items()}


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
