"""Shared helpers: progress bars, devices per rank, output folders, status histograms."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Which validated candidates the review app shows, by their automatic decision (here, not in review.py,
# so that `safetypairs review --help` offers them without importing `datasets`).
REVIEW_SCOPES = ("accepted", "borderline", "rejected", "all")


def progress_enabled() -> bool:
    """Progress bars show unless ``SAFETYPAIRS_NO_PROGRESS`` is set or datasets' bars are off."""
    if os.environ.get("SAFETYPAIRS_NO_PROGRESS"):
        return False
    from datasets.utils.logging import is_progress_bar_enabled

    return is_progress_bar_enabled()


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap an iterable in the library's one progress bar (tqdm, shared look with `datasets`).

    Args:
        iterable: what to iterate.
        desc: the bar's label.
        total: the length, when the iterable has none.

    Yields:
        The items of ``iterable``.
    """
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, disable=not progress_enabled(), leave=False)


def device_for_rank(device: str, rank: int | None) -> str:
    """Pick the torch device for a `Dataset.map` rank.

    Args:
        device: ``"auto"`` (cuda:<rank mod gpus> when CUDA is available, else cpu) or an
            explicit torch device string, used as given.
        rank: the process rank from ``with_rank=True``; ``None`` in a single process.

    Returns:
        A torch device string.
    """
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{(rank or 0) % torch.cuda.device_count()}"
    return "cpu"


class OutputDirError(OSError):
    """An output folder cannot be used: not a folder, not writable, or not empty without overwrite."""


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create (or, with ``overwrite``, empty) an output folder and check that it is writable.

    Args:
        out: the folder.
        overwrite: replace a non-empty folder instead of refusing it.

    Returns:
        The folder as a `Path`.

    Raises:
        OutputDirError: with a one-line reason.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"cannot write to output folder {str(out)!r}: {err.strerror or err}") from err
    return out


def status_histogram(values: Iterable[str | None]) -> dict[str, int]:
    """Count statuses (``None`` counts as ``"ok"``), most common first."""
    return dict(Counter(v or "ok" for v in values).most_common())
