"""Chunks of a sharded run: the fixed chunks, the claims that say which rank computes which, done-markers, and the
merge into ``data/``."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from safetypairs.engine.datafiles import DATA_DIR
from safetypairs.engine.folders import read_json, utc_now

CHUNKS_DIR = "chunks"
CLAIMS_DIR = "claims"  # under CHUNKS_DIR: one folder per attempt (run id), one claim file per chunk or piece
MERGE_ROWS = 2000  # rows per merged data file (whole chunks)


def chunk_spans(n_rows: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """Every chunk's ``(index, start, stop)``: fixed global chunks, so chunk contents (and batches) do not depend on
    the number of processes or on which rank computes which chunk."""
    return [(c, start, min(n_rows, start + chunk_size)) for c, start in enumerate(range(0, n_rows, chunk_size))]


def chunk_ranges(n_rows: int, chunk_size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """The chunks one rank would get if they were dealt out up front in contiguous runs (the runner claims them as
    it goes instead, `Claims`): the reference the benchmarks compare the claimed assignment with."""
    spans = chunk_spans(n_rows, chunk_size)
    return spans[len(spans) * rank // world:len(spans) * (rank + 1) // world]


def claims_folder(work: Path, run_id: str) -> Path:
    """The folder of one attempt's claims."""
    return work / CHUNKS_DIR / CLAIMS_DIR / run_id


def open_claims(work: Path, run_id: str) -> None:
    """Rank 0, holding the work folder's lock: drop the claims of earlier attempts (a claim left by a killed run
    must not keep its chunk from this one; the lock says no earlier attempt runs) and make this attempt's folder."""
    shutil.rmtree(work / CHUNKS_DIR / CLAIMS_DIR, ignore_errors=True)
    claims_folder(work, run_id).mkdir(parents=True)


@dataclass(frozen=True)
class Claims:
    """One rank's claims in one attempt of a run: a rank computes a chunk (or a pass's piece of one) only once it
    holds its claim, a file created exclusively (``O_CREAT | O_EXCL``), so of the ranks that try, exactly one
    computes it; ranks that run out of work early take more chunks instead of waiting on a fixed share.

    Attributes:
        work: the run's work folder.
        run_id: the attempt (`open_claims` made its folder).
        rank: this process's rank (recorded in each claim, with host, pid and time).
    """

    work: Path
    run_id: str
    rank: int

    def path(self, index: int, piece: str = "") -> Path:
        """The claim file of chunk ``index`` (or of its ``piece``)."""
        return claims_folder(self.work, self.run_id) / f"chunk-{index:06d}{piece}.json"

    def take(self, index: int, piece: str = "") -> bool:
        """Claim chunk ``index`` (or its ``piece``) for this rank.

        Returns:
            ``True`` when this rank now holds the claim, ``False`` when another rank of this attempt holds it.
        """
        try:
            fd = os.open(self.path(index, piece), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        owner = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "since": utc_now()}
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(owner, handle)
        return True

    def held(self) -> list[Path]:
        """Every claim file of this attempt, in chunk order; each is named as its chunk's (or piece's) done-marker."""
        return sorted(claims_folder(self.work, self.run_id).glob("chunk-*.json"))

    def ranks(self) -> dict[str, int | None]:
        """``{"<index><piece>": rank}`` of every claim of this attempt (``"3"`` for chunk 3, ``"3.pass-000"`` for
        a piece of it), in chunk order."""
        found = {}
        for path in self.held():
            index, dot, piece = path.stem.removeprefix("chunk-").partition(".")
            found[f"{int(index)}{dot}{piece}"] = (read_json(path) or {}).get("rank")
        return found


def chunk_path(out: Path, index: int, suffix: str) -> Path:
    """The chunk file of ``index`` (``.parquet`` data or ``.json`` done-marker)."""
    return out / CHUNKS_DIR / f"chunk-{index:06d}{suffix}"


def chunk_done(out: Path, index: int, piece: str = "") -> bool:
    """A chunk (or one pass's ``piece`` of it, see `runner.Passes`) is finished when its parquet and its JSON marker
    (written last) both exist."""
    return (chunk_path(out, index, f"{piece}.parquet").exists()
            and read_json(chunk_path(out, index, f"{piece}.json")) is not None)


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
