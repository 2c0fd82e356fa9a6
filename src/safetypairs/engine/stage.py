"""The one way a stage runs: a picklable batched transform mapped over a `datasets.Dataset`,
with backend failures isolated to the rows that caused them."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from datasets import Dataset, Features, Image

from safetypairs.engine.imagechecks import stored_png
from safetypairs.images import RUN_PNG_LEVEL
from safetypairs.schema import IMAGE_CHECKS
from safetypairs.utils import datasets_progress, inside_progress, progress_enabled, status_histogram

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


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
    png_level: int = RUN_PNG_LEVEL,
) -> tuple[Dataset, StageResult]:
    """Run a stage transform with ``Dataset.map(batched=True, with_rank=True)``.

    Image columns reach the transform undecoded (see `undecoded`). The transform holds only plain config (so the map
    fingerprint is stable and the `datasets` cache is reused on a re-run) and loads models lazily per process and
    device. The map's progress bar (labelled ``stage``) shows only outside the shared runner, whose chunk bar is
    the stage's one bar there.

    New images the transform returns (edits, masks: made in memory, RGB or L) are stored as PNG at ``png_level``
    (`imagechecks.stored_png`); when the rows carry ``image_checks`` (they come from a run folder), each one's
    record joins its row's, so the run writer decodes none of them to check it. Other values of image columns
    are stored by `datasets` as before.

    Args:
        dataset: the input rows.
        transform: a callable ``(batch, rank) -> batch`` that keeps the row count.
        stage: the stage name, for the progress bar and the summary.
        features: the output features.
        status_column: the column holding each row's status.
        batch_size: rows per call.
        num_proc: processes (one per GPU); ``None`` or 1 runs in this process.
        rows_per_input: rows the transform emits per input row (K candidates per source).
        png_level: zlib level of the new images' PNGs (`images.RUN_PNG_LEVEL`, fast, for run folders; -1 is
            the default level that `datasets` uses); the pixels are the same at every level.

    Returns:
        The mapped dataset and a `StageResult` (rows out = rows in x rows_per_input).

    Raises:
        RuntimeError: if the transform lost or added rows.
    """
    rows_in = len(dataset)
    dataset = undecoded(dataset)
    multi = num_proc is not None and num_proc > 1
    if rows_in:  # the map's bar is the stage's bar, unless the shared runner's chunk bar already shows
        with _spawn_for_cuda(multi), datasets_progress(progress_enabled() and not inside_progress()):
            out = dataset.map(
                _Stored(transform, tuple(n for n, f in features.items() if isinstance(f, Image)), png_level,
                        IMAGE_CHECKS in features),
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
    # the column as Arrow holds it (a map's output has no indices mapping): no formatting pass over the rows
    result = StageResult(stage, rows_in, len(out), status_histogram(out.data.column(status_column).to_pylist()))
    logger.info("%s: %d rows in, %d out, statuses %s", stage, rows_in, len(out), result.statuses)
    return out, result


def isolate(call: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[tuple[R | None, str | None]]:
    """Call a backend on a batch so that a failing item fails alone, and a batch too large for memory is halved.

    ``call(items)`` runs once. If it runs out of memory (``torch.OutOfMemoryError``), each half of the batch is
    run the same way, so a batch of 4 that does not fit becomes calls of 2 and 2 (then 1 and 1 if 2 do not fit).
    If it raises anything else or answers for the wrong number of items, every item is retried on its own, and an
    item that still fails gets the error text instead of a result (a lone item is not called twice). Interrupts
    (``BaseException``) are not caught.

    Args:
        call: maps a list of items to one result per item, in order.
        items: the batch.

    Returns:
        One ``(result, None)`` or ``(None, "<ExceptionType>: <message>")`` per item, in order.
    """
    items = list(items)
    if not items:
        return []
    results, error, out_of_memory = _attempt(call, items)
    if error is None:
        return [(result, None) for result in results]
    if len(items) == 1:
        return [(None, error)]
    if out_of_memory:
        half = (len(items) + 1) // 2
        logger.warning("a batch of %d ran out of memory; retrying as %d + %d", len(items), half, len(items) - half)
        return isolate(call, items[:half]) + isolate(call, items[half:])
    logger.debug("batch of %d failed (%s); retrying item by item", len(items), error)
    out: list[tuple[R | None, str | None]] = []
    for item in items:
        results, error, _ = _attempt(call, [item])
        out.append((results[0] if error is None else None, error))
    return out


def error_text(err: BaseException) -> str:
    """``"<Type>: <message>"``; an exception raised with no message says where it was raised instead of nothing."""
    message = str(err).strip()
    if not message:
        frames = traceback.extract_tb(err.__traceback__)
        where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
        message = f"raised with no message{where}"
    return f"{type(err).__name__}: {message}"


def _attempt(call: Callable[[list[T]], Sequence[R]], items: list[T]) -> tuple[list[R], str | None, bool]:
    """``(results, None, False)``, or ``([], error text, whether it was torch running out of memory)``."""
    import sys

    try:
        results = list(call(items))
    except Exception as err:  # noqa: BLE001 - a backend failure becomes the items' error text
        logger.debug("backend call on %d item(s) failed", len(items), exc_info=True)
        torch = sys.modules.get("torch")  # only torch raises its out-of-memory error, so it is imported by then
        return [], error_text(err), torch is not None and isinstance(err, torch.OutOfMemoryError)
    if len(results) != len(items):
        return [], f"the backend returned {len(results)} result(s) for {len(items)} item(s)", False
    return results, None, False


def empty_dataset(features: Features) -> Dataset:
    """A dataset with no rows but every column of ``features`` (``Dataset.map`` keeps none on empty input)."""
    return Dataset.from_dict({name: [] for name in features}, features=features)


def undecoded(dataset: Dataset) -> Dataset:
    """The same rows with image columns left as ``{"bytes", "path"}`` dicts.

    Transforms decode images themselves with `images.load_image`, so a corrupt image becomes a
    row status instead of an exception inside `datasets`' decoder.
    """
    for name, feature in dataset.features.items():
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(name, Image(decode=False))
    return dataset


@dataclass(frozen=True)
class _Stored:
    """``transform`` whose new in-memory images are stored as PNG at ``png_level`` (and recorded, with ``record``)."""

    transform: Any
    columns: tuple[str, ...]
    png_level: int
    record: bool

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        out = dict(self.transform(batch, rank))
        n = len(next(iter(out.values()), []))
        found: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for name in self.columns:
            if name not in out:
                continue
            values = list(out[name])
            for i, value in enumerate(values):
                stored = stored_png(value, self.png_level)
                if stored is not None:
                    values[i] = stored[0]
                    found[i].append(stored[1]._asdict())
            out[name] = values
        had = out.get(IMAGE_CHECKS, batch.get(IMAGE_CHECKS) if len(batch.get(IMAGE_CHECKS) or []) == n else None)
        if self.record and had is not None and any(found):
            out[IMAGE_CHECKS] = [[*(old or []), *new] for old, new in zip(had, found)]
        return out


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
