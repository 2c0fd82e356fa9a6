"""Shared helpers: progress bars, devices per rank, CPU thread budget, output folders, status histograms, value
ranges."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Which validated candidates the review app shows, by their automatic decision (here, not in review.py,
# so that `safetypairs review --help` offers them without importing `datasets`).
REVIEW_SCOPES = ("accepted", "borderline", "rejected", "all")


_bars_switch: bool | None = None  # the bar switch the library follows while it holds `datasets`' switch itself


def progress_enabled() -> bool:
    """The library's progress bars show unless ``SAFETYPAIRS_NO_PROGRESS`` is set (``safetypairs -q`` sets it) or
    `datasets`' bars are off (``datasets.disable_progress_bars()`` quiets a notebook).

    While the library switches `datasets`' bars itself (`datasets_progress`), the switch as the user left it decides
    (or, for a command line run, the command's choice).
    """
    if os.environ.get("SAFETYPAIRS_NO_PROGRESS"):
        return False
    if _bars_switch is not None:
        return _bars_switch
    from datasets.utils.logging import is_progress_bar_enabled

    return is_progress_bar_enabled()


_open_bars = 0  # how many `progress` bars of this process are being iterated now


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap an iterable in the library's one progress bar (tqdm, shared look with `datasets`).

    A bar opened while another is being iterated (a stage inside the shared runner's chunk loop) stays hidden:
    one bar per stage.

    Args:
        iterable: what to iterate.
        desc: the bar's label.
        total: the length, when the iterable has none.

    Yields:
        The items of ``iterable``.
    """
    from tqdm.auto import tqdm

    global _open_bars
    show = progress_enabled() and not _open_bars
    _open_bars += 1
    try:
        yield from tqdm(iterable, desc=desc, total=total, disable=not show, leave=False)
    finally:
        _open_bars -= 1


def inside_progress() -> bool:
    """Whether a `progress` bar is being iterated in this process (a nested bar would break its line)."""
    return _open_bars > 0


@contextmanager
def datasets_progress(show: bool, library: bool | None = None) -> Iterator[None]:
    """`datasets`' own progress bars (``Dataset.map``, "Flattening the indices" ...) on or off inside the block,
    restored after it (``HF_DATASETS_DISABLE_PROGRESS_BARS``, when set, decides instead, as in `datasets`).

    Args:
        show: whether they show.
        library: whether the library's own bars (`progress`) show inside the block; ``None``: as the user's switch
            said before the block (the command line passes ``True``: stage bars only).
    """
    global _bars_switch
    from datasets import config
    from datasets.utils import logging as ds_logging

    before = ds_logging.is_progress_bar_enabled()
    outer = _bars_switch
    _bars_switch = library if library is not None else before if outer is None else outer
    switch = show != before and config.HF_DATASETS_DISABLE_PROGRESS_BARS is None
    if switch:
        ds_logging.enable_progress_bar() if show else ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if switch:
            ds_logging.enable_progress_bar() if before else ds_logging.disable_progress_bar()
        _bars_switch = outer


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


def cpu_threads() -> int | None:
    """The CPU threads this process may use, as the user set them with ``OMP_NUM_THREADS``; ``None`` when unset.

    torch follows ``OMP_NUM_THREADS``, ONNX Runtime does not: its pool takes every core and spin-waits. The ONNX
    backends (rapidocr, NudeNet) pass this on, so that one-thread processes sharing the cores (torchrun ranks on a
    CPU machine, test workers) do not oversubscribe them.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def opencv() -> Any:
    """The ``cv2`` module, its thread pool kept to the process's budget (`cpu_threads`) when one is set.

    Like ONNX Runtime, OpenCV ignores ``OMP_NUM_THREADS``: its pool spans every core, so a one-thread worker's
    SSIM or inpainting spread over two cores (20% more CPU for the validation metrics on a 2-core machine, and
    the other workers' cores taken). The modules that use OpenCV import it through this.
    """
    import cv2

    if (threads := cpu_threads()) is not None:
        cv2.setNumThreads(threads)
    return cv2


def status_histogram(values: Iterable[str | None]) -> dict[str, int]:
    """Count statuses (``None`` counts as ``"ok"``), most common first."""
    return dict(Counter(v or "ok" for v in values).most_common())


@dataclass(frozen=True)
class Range:
    """An allowed interval of numbers: a bound of ``None`` is unbounded, ``open_low``/``open_high`` exclude
    the bound itself, ``optional`` also allows ``None``. NaN, text and bools are never in a range."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False

    def __contains__(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.open_low else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.open_high else '<='} {self.high:g}"
        else:
            text = "any number"
        return text + (" or None" if self.optional else "")


def check_ranges(owner: str, values: Mapping[str, Any], ranges: Mapping[str, Range]) -> None:
    """Check each named value against its range (one place per range rule: the ``ranges`` table).

    Args:
        owner: what the values belong to, for the message (e.g. ``"threshold"``, ``"ValidateConfig"``).
        values: name -> value (names missing here are not checked).
        ranges: name -> allowed `Range`.

    Raises:
        ValueError: naming every value out of its range, with the value and the allowed range.
    """
    bad = [f"{name}={values[name]!r} (allowed: {allowed})" for name, allowed in ranges.items()
           if name in values and values[name] not in allowed]
    if bad:
        raise ValueError(f"invalid {owner} value(s): {'; '.join(bad)}")


class LRU(Generic[T]):
    """A bounded mapping that forgets the least recently used entry first."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable) -> T | None:
        """The value under ``key`` (now the most recently used), or ``None``."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: T) -> None:
        """Keep ``value`` under ``key``, forgetting the oldest entry past ``maxsize``."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
