"""Publishing a release: assemble validated rows, write the hub layout (card, parquet, example grid)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset

from safetypairs.release.builder import load_raw
from safetypairs.release.card import render_card, write_example_grid
from safetypairs.engine.datafiles import read_rows, shards, write_parquet
from safetypairs.engine.folders import atomic_dir
from safetypairs.release.assemble import Release, ReleaseConfig, assemble
from safetypairs.review.store import ReviewResult
from safetypairs.utils import progress

logger = logging.getLogger(__name__)


def write_release(
    data: Release | Dataset,
    out_dir: str | Path,
    config: ReleaseConfig | None = None,
    *,
    funnel: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
    inputs: tuple[str | Path, ...] = (),
    review: ReviewResult | None = None,
    before_rename: Callable[[Path], object] | None = None,
) -> Path:
    """Write the exact hub layout: ``README.md`` card, ``data/<config>/<split>-xxxxx-of-xxxxx.parquet``, ``assets/``.

    ``datasets.load_dataset(out_dir)`` then loads ``pairs`` and ``load_dataset(out_dir, "images")``
    the per-image config, with no safetypairs import.

    Args:
        data: an assembled `Release`, or validated candidate rows (assembled here with ``config``).
        out_dir: the folder to write (created; must be empty unless ``overwrite``).
        config: release options (default `ReleaseConfig()`).
        funnel: the pipeline's stage results (``StageResult.as_dict()`` list) for the card.
        overwrite: replace a non-empty ``out_dir`` (only once the new release is complete).
        inputs: input paths ``out_dir`` must not be or contain.
        review: human verdicts (`review.store.load_review`) to release only verified pairs; needs validated rows.
        before_rename: called with the complete work folder before it moves into place (the Hub upload
            of ``--push``): when it raises, no folder is left.

    Returns:
        ``out_dir`` as a `Path`.

    The folder appears whole or not at all: it is written into a locked ``<out_dir>.partial``
    sibling and renamed into place, so a failure part-way leaves the previous folder (or none).
    Image cells that do not decode within ``config.max_pixels`` are written as null (`datafiles.write_parquet`).

    Raises:
        OutputDirError: if ``out_dir`` is an input, not empty and ``overwrite`` is false, not writable,
            or being written by another process.
        ValueError: when no candidate was accepted, or ``review`` is given with an assembled `Release`.
    """
    config = config or ReleaseConfig()
    if review is not None and not isinstance(data, Dataset):
        raise ValueError("a review applies to validated rows, not to an assembled release (raw layout)")
    with atomic_dir(out_dir, overwrite, inputs) as work:
        release = assemble(data, config, review) if isinstance(data, Dataset) else data
        jobs = [(c, s, ds) for c, dd in release.configs.items() for s, ds in dd.items()]
        for config_name, split, ds in progress(jobs, desc="write release"):
            (work / "data" / config_name).mkdir(parents=True, exist_ok=True)
            for index, n, shard in shards(ds, config.max_shard_size):
                path = work / "data" / config_name / f"{split}-{index:05d}-of-{n:05d}.parquet"
                if images := write_parquet(shard, path, config.max_pixels, known=release.checked):
                    logger.warning("release %s/%s: image cells stored as null or reduced: %s", config_name, split, images)
        grid = write_example_grid(release, work, config.n_examples)
        render_card(release, work, config, funnel=funnel, grid=grid).save(work / "README.md")
        if before_rename is not None:
            before_rename(work)
    logger.info("release written to %s", out_dir)
    return Path(out_dir)


def read_input(path: str | Path) -> Release | Dataset:
    """Read what ``safetypairs release`` was given.

    Args:
        path: a raw layout (``metadata.jsonl``, see `builder.export_raw`) or anything
            `engine.datafiles.read_rows` reads (validated rows from ``safetypairs validate``, a parquet folder).

    Returns:
        Validated rows (a `Dataset`) or, for a raw layout, a ready `Release`.

    Raises:
        FileNotFoundError: if ``path`` is not a folder or holds none of these.
    """
    if (Path(path) / "metadata.jsonl").is_file():
        return load_raw(Path(path))
    return read_rows(path)
