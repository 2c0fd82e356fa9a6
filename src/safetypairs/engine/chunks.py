"""Chunks of a sharded run: which rank computes which rows, done-markers, and the merge into ``data/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from safetypairs.engine.datafiles import DATA_DIR
from safetypairs.engine.folders import read_json

CHUNKS_DIR = "chunks"
MERGE_ROWS = 2000  # rows per merged data file (whole chunks)


def chunk_ranges(n_rows: int, chunk_size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """The ``(chunk index, start, stop)`` of one rank: a contiguous run of global chunks, so
    chunk contents (and batches) do not depend on the number of processes."""
    n_chunks = -(-n_rows // chunk_size)
    first, last = n_chunks * rank // world, n_chunks * (rank + 1) // world
    return [(c, c * chunk_size, min(n_rows, (c + 1) * chunk_size)) for c in range(first, last)]


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
