"""Publishing a release: assemble validated rows, write the hub layout (card, parquet, example grid)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from datasets import Dataset

from safetypairs.builder import load_raw
from safetypairs.card import render_card, write_example_grid
from safetypairs.release import Release, ReleaseConfig, assemble
from safetypairs.review import ReviewResult
from safetypairs.runner import read_rows, shards, write_parquet
from safetypairs.utils import prepare_out_dir, progress

logger = logging.getLogger(__name__)


def write_release(
    data: Release | Dataset,
    out_dir: str | Path,
    config: ReleaseConfig | None = None,
    *,
    funnel: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
    review: ReviewResult | None = None,
) -> Path:
    """Write the exact hub layout: ``README.md`` card, ``data/<config>/<split>-xxxxx-of-xxxxx.parquet``, ``assets/``.

    ``datasets.load_dataset(out_dir)`` then loads ``pairs`` and ``load_dataset(out_dir, "images")``
    the per-image config, with no safetypairs import.

    Args:
        data: an assembled `Release`, or validated candidate rows (assembled here with ``config``).
        out_dir: the folder to write (created; must be empty unless ``overwrite``).
        config: release options (default `ReleaseConfig()`).
        funnel: the pipeline's stage results (``StageResult.as_dict()`` list) for the card.
        overwrite: replace a non-empty ``out_dir``.
        review: human verdicts (`review.load_review`) to release only verified pairs; needs validated rows.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        OutputDirError: if ``out_dir`` is not empty and ``overwrite`` is false, or not writable.
        ValueError: if ``review`` is given with an already assembled `Release`.
    """
    config = config or ReleaseConfig()
    if review is not None and not isinstance(data, Dataset):
        raise ValueError("a review applies to validated rows, not to an assembled release (raw layout)")
    release = assemble(data, config, review) if isinstance(data, Dataset) else data
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    jobs = [(c, s, ds) for c, dd in release.configs.items() for s, ds in dd.items()]
    for config_name, split, ds in progress(jobs, desc="write release"):
        (out_dir / "data" / config_name).mkdir(parents=True, exist_ok=True)
        for index, n, shard in shards(ds, config.max_shard_size):
            write_parquet(shard, out_dir / "data" / config_name / f"{split}-{index:05d}-of-{n:05d}.parquet")
    grid = write_example_grid(release, out_dir, config.n_examples)
    card = render_card(release, out_dir, config, funnel=funnel, grid=grid)
    card.save(out_dir / "README.md")
    logger.info("release written to %s", out_dir)
    return out_dir


def read_input(path: str | Path) -> Release | Dataset:
    """Read what ``safetypairs release`` was given.

    Args:
        path: a raw layout (``metadata.jsonl``, see `builder.export_raw`) or anything
            `stage.read_rows` reads (validated rows from ``safetypairs validate``, a parquet folder).

    Returns:
        Validated rows (a `Dataset`) or, for a raw layout, a ready `Release`.

    Raises:
        FileNotFoundError: if ``path`` is not a folder or holds none of these.
    """
    if (Path(path) / "metadata.jsonl").is_file():
        return load_raw(Path(path))
    return read_rows(path)
