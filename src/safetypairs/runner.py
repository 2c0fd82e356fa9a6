"""The one run folder every sharded stage writes: chunks, rank shards, resume, merge, ``run.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from datasets import Dataset, load_dataset
from datasets.table import embed_table_storage
from datasets.utils.py_utils import convert_file_size_to_int

RUN_FILE = "run.json"
BARRIER_TIMEOUT = timedelta(hours=6)  # rank 0 waits this long for the slowest rank before merging
ROW_GROUP_SIZE = 64  # rows per parquet row group and per map batch: bounds memory with images
CHUNKS_DIR = "chunks"
DATA_DIR = "data"
MERGE_ROWS = 2000  # candidate rows per merged data file (whole chunks)


def chunk_ranges(n_rows: int, chunk_size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """The ``(chunk index, start, stop)`` of one rank: a contiguous run of global chunks, so
    chunk contents (and batches) do not depend on the number of processes."""
    n_chunks = -(-n_rows // chunk_size)
    first, last = n_chunks * rank // world, n_chunks * (rank + 1) // world
    return [(c, c * chunk_size, min(n_rows, (c + 1) * chunk_size)) for c in range(first, last)]


def chunk_path(out: Path, index: int, suffix: str) -> Path:
    return out / CHUNKS_DIR / f"chunk-{index:06d}{suffix}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a killed run never leaves a half-written file under the final name)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def chunk_done(out: Path, index: int) -> bool:
    """A chunk is finished when its parquet and its JSON marker (written last) both exist."""
    return chunk_path(out, index, ".parquet").exists() and read_json(chunk_path(out, index, ".json")) is not None


def merge_chunks(out: Path, n_chunks: int) -> tuple[list[Path], int, list[dict[str, Any]]]:
    """Stream every chunk, in source order, into ``out/data/train-*.parquet``.

    Args:
        out: the run folder.
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


def model_info(spec: str) -> dict[str, Any]:
    """Model id and revision behind an ``hf-vlm:`` or ``diffusers:`` spec (local path or hub cache commit)."""
    from huggingface_hub import try_to_load_from_cache

    arg = spec.partition(":")[2]
    if not arg or spec.partition(":")[0] not in ("hf-vlm", "diffusers"):
        return {"spec": spec}
    if os.path.isdir(arg):
        return {"spec": spec, "model": os.path.abspath(arg), "revision": "local"}
    for name in ("model_index.json", "config.json"):
        cached = try_to_load_from_cache(arg, name)
        if isinstance(cached, str):  # .../snapshots/<commit>/<name>
            return {"spec": spec, "model": arg, "revision": Path(cached).parent.name}
    return {"spec": spec, "model": arg, "revision": None}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("safetypairs", "torch", "diffusers", "transformers", "datasets", "accelerate", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _state(device: str) -> Any:
    """The accelerate process state (``cpu=True`` without CUDA: gloo between CPU processes)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def _check_run(out: Path, fingerprint: str) -> bool:
    """Refuse to mix chunks of a different run (config, chunking or source changed) in one folder.

    Returns:
        Whether ``run.json`` must be (re)written: it is missing, or names a run that finished no chunk.
    """
    meta = read_json(out / RUN_FILE)
    if not meta:
        return True
    if meta.get("fingerprint") == fingerprint:
        return False
    if any((out / CHUNKS_DIR).glob("chunk-*.json")):
        raise ValueError(f"{str(out)!r} holds a run with different settings or source (fingerprint "
                         f"{meta.get('fingerprint')} != {fingerprint}); use a new --out folder or delete it")
    return True


def _shared_run_id(state: Any) -> str:
    """A random id chosen by rank 0 and broadcast, recorded in every chunk this run computes."""
    from accelerate.utils import broadcast_object_list

    ids = [os.urandom(8).hex()]
    if state.num_processes > 1:
        broadcast_object_list(ids, from_process=0)
    return ids[0]


def load_run(out: str | Path) -> Dataset:
    """Load the merged rows of a finished run (``out/data/*.parquet``) as one `datasets.Dataset`."""
    files = sorted(str(p) for p in (Path(out) / DATA_DIR).glob("train-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no merged data in {str(Path(out) / DATA_DIR)!r}; has the run finished?")
    return load_dataset("parquet", data_files=files, split="train")


def shards(dataset: Dataset, max_shard_size: int | str) -> Iterator[tuple[int, int, Dataset]]:
    """Contiguous shards of at most ~``max_shard_size`` (estimated like `Dataset.push_to_hub`)."""
    n = max(1, int(dataset._estimate_nbytes() / convert_file_size_to_int(max_shard_size)) + 1)
    n = min(n, max(1, len(dataset)))
    for index in range(n):
        yield index, n, dataset.shard(num_shards=n, index=index, contiguous=True)


def write_parquet(dataset: Dataset, path: Path) -> int:
    """Write one parquet shard with image bytes embedded, in row groups of `ROW_GROUP_SIZE` (flat memory).

    Args:
        dataset: the rows; its features (Image, ClassLabel) go into the schema metadata.
        path: the file to write.

    Returns:
        The number of rows written.
    """
    schema = dataset.features.arrow_schema
    with pq.ParquetWriter(path, schema=schema) as writer:
        for table in dataset.with_format("arrow").iter(batch_size=ROW_GROUP_SIZE):
            writer.write_table(embed_table_storage(table).cast(schema), row_group_size=ROW_GROUP_SIZE)
    return len(dataset)


def data_files(out_dir: Path, config_name: str, split: str) -> list[Path]:
    """The parquet shards of one config and split in a release folder, sorted."""
    return sorted((out_dir / "data" / config_name).glob(f"{split}-*.parquet"))


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return any((Path(path) / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json"))


def read_rows(path: str | Path) -> Dataset:
    """Read the rows a stage wrote, whatever the writer.

    Args:
        path: a ``safetypairs generate`` run folder (``run.json`` + ``data/*.parquet``), a folder
            written by `Dataset.save_to_disk`, or a folder of parquet files / a hub layout (all
            splits are concatenated).

    Returns:
        The rows.

    Raises:
        FileNotFoundError: if ``path`` is not a folder or holds none of these.
    """
    from datasets import DatasetDict, concatenate_datasets, load_dataset, load_from_disk

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"input {str(root)!r} is not a folder")
    if (root / "run.json").is_file():
        return load_run(root)
    if is_saved_dataset(root):
        loaded = load_from_disk(str(root))
    elif (root / "README.md").is_file() or any(root.rglob("*.parquet")):
        loaded = load_dataset(str(root))
    else:
        raise FileNotFoundError(f"{str(root)!r} holds no generate run, save_to_disk dataset or parquet files")
    return concatenate_datasets(list(loaded.values())) if isinstance(loaded, DatasetDict) else loaded
