"""The one way a stage runs: a picklable batched transform mapped over a `datasets.Dataset`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, Features, Image

from safetypairs.utils import status_histogram

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    """What a stage run reports: rows in and out and its status histogram."""

    stage: str
    rows_in: int
    rows_out: int
    statuses: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for ``results.json``."""
        return {"stage": self.stage, "rows_in": self.rows_in, "rows_out": self.rows_out, "statuses": self.statuses}


def map_stage(
    dataset: Dataset,
    transform: Any,
    *,
    stage: str,
    features: Features,
    status_column: str,
    batch_size: int = 8,
    num_proc: int | None = None,
    rows_per_input: int = 1,
) -> tuple[Dataset, StageResult]:
    """Run a stage transform with ``Dataset.map(batched=True, with_rank=True)``.

    Image columns reach the transform undecoded (see `undecoded`). The transform holds only plain config (so the map fingerprint is stable and the `datasets`
    cache is reused on a re-run) and loads models lazily per process and device.

    Args:
        dataset: the input rows.
        transform: a callable ``(batch, rank) -> batch`` that keeps the row count.
        stage: the stage name, for the progress bar and the summary.
        features: the output features.
        status_column: the column holding each row's status.
        batch_size: rows per call.
        num_proc: processes (one per GPU); ``None`` or 1 runs in this process.
        rows_per_input: rows the transform emits per input row (K candidates per source).

    Returns:
        The mapped dataset and a `StageResult` (rows out = rows in x rows_per_input).

    Raises:
        RuntimeError: if the transform lost or added rows.
    """
    rows_in = len(dataset)
    dataset = undecoded(dataset)
    multi = num_proc is not None and num_proc > 1
    if rows_in:
        with _spawn_for_cuda(multi):
            out = dataset.map(
                transform,
                batched=True,
                batch_size=batch_size,
                with_rank=True,
                num_proc=num_proc if multi else None,
                features=features,
                desc=stage,
            )
    else:  # Dataset.map returns empty data as it is, without the stage's columns
        out = empty_dataset(features)
    if len(out) != rows_in * rows_per_input:
        raise RuntimeError(f"stage {stage!r} turned {rows_in} rows into {len(out)} (expected x{rows_per_input})")
    result = StageResult(stage, rows_in, len(out), status_histogram(out[status_column]))
    logger.info("%s: %d rows in, %d out, statuses %s", stage, rows_in, len(out), result.statuses)
    return out, result


def empty_dataset(features: Features) -> Dataset:
    """A dataset with no rows but every column of ``features`` (``Dataset.map`` keeps none on empty input)."""
    return Dataset.from_dict({name: [] for name in features}, features=features)


def undecoded(dataset: Dataset) -> Dataset:
    """The same rows with image columns left as ``{"bytes", "path"}`` dicts.

    Transforms decode images themselves with `utils.load_image`, so a corrupt image becomes a
    row status instead of an exception inside `datasets`' decoder.
    """
    for name, feature in dataset.features.items():
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(name, Image(decode=False))
    return dataset


@contextmanager
def _spawn_for_cuda(multi: bool) -> Iterator[None]:
    """CUDA cannot be used in forked children: `multiprocess` spawns while a multi-process map runs on a
    machine with a GPU, and the caller's start method is restored afterwards."""
    import torch

    if not (multi and torch.cuda.is_available()):
        yield
        return
    import multiprocess

    previous = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocess.set_start_method(previous, force=True)
