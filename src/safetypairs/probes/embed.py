"""Embed stage: one image-encoder embedding per row (no images kept), cached by encoder and input content."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features

from safetypairs.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_max_pixels,
    image_digest,
    load_image,
)
from safetypairs.backends.registry import available, backend_class, load_backend, parse_spec
from safetypairs.schema import (
    CATEGORY,
    EMBED_ERROR,
    EMBED_FEATURES,
    EMBED_STATUS,
    EMBEDDING,
    IMAGE,
    IMAGE_DIGEST,
    LABEL,
    PAIR_ID,
    ROLE,
    SAFE,
    SOURCE_ID,
    SOURCE_LABEL,
    UNSAFE,
    with_columns,
)
from safetypairs.statuses import OK
from safetypairs.engine.runner import for_rank, run_stage
from safetypairs.engine.stage import StageResult, map_stage
from safetypairs.utils import device_for_rank

logger = logging.getLogger(__name__)

STAGE = "embed"
KEEP_COLUMNS = (PAIR_ID, ROLE, LABEL, CATEGORY, SOURCE_ID)  # carried over from the input when present


def embedding_encoders() -> list[str]:
    """The registered encoder aliases that embed images (``lpips`` gives distance maps, not embeddings)."""
    return [alias for alias in available("encoders") if callable(getattr(backend_class("encoders", alias), "embed", None))]


@dataclass(frozen=True)
class EmbedConfig:
    """What to embed and how.

    Attributes:
        encoder: an encoder spec that embeds (``open_clip:<arch>/<pretrained>``, ``hf-clip:<id or path>``,
            ``ocr-text[:dim=..,ngrams=..]``).
        image_column: the column holding the images.
        device: ``"auto"`` (the rank's GPU when present) or a torch device string.
        batch_size: images per encoder call.
        num_proc: `Dataset.map` processes for `run_embed` (one per GPU); ``None`` for this process.
        max_pixels: images with more pixels are decoded reduced (JPEG) or get status ``too_large``.
    """

    encoder: str
    image_column: str = IMAGE
    device: str = "auto"
    batch_size: int = 32
    num_proc: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)
        alias = parse_spec("encoders", self.encoder).alias
        allowed = embedding_encoders()
        if alias not in allowed:
            raise ValueError(f"encoder {self.encoder!r} does not embed images; allowed: {', '.join(allowed)}")
        if self.batch_size < 1:
            raise ValueError(f"EmbedConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"EmbedConfig.num_proc must be >= 1 or None, got {self.num_proc}")

    def settings(self) -> dict[str, Any]:
        """What decides the output rows (the run fingerprint): the encoder, the image column, the pixel cap
        and the columns the stage writes."""
        return {"encoder": self.encoder, "image_column": self.image_column, "max_pixels": self.max_pixels,
                "columns": list(EMBED_FEATURES)}


@dataclass(frozen=True)
class EmbedTransform:
    """Batched `Dataset.map` transform adding ``embedding, image_digest, embed_status, embed_error``.

    Holds only plain config; the encoder is built lazily once per process and device. Each image's
    pixel digest is taken from the decoded image the encoder sees (the identity `identity` compares).
    An image that cannot be read gets a null embedding and status ``unreadable`` (or ``too_large``; the error names the row).
    """

    encoder: str
    image_column: str = IMAGE
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        """Embed the readable images of a batch in one encoder call."""
        n = len(batch[self.image_column])
        out: dict[str, list] = {EMBEDDING: [None] * n, IMAGE_DIGEST: [None] * n, EMBED_STATUS: [OK] * n,
                                EMBED_ERROR: [None] * n}
        images, keep = [], []
        for i, cell in enumerate(batch[self.image_column]):
            try:
                images.append(load_image(cell, self.max_pixels))
                out[IMAGE_DIGEST][i] = image_digest(images[-1])
                keep.append(i)
            except ImageError as err:
                row = batch[SOURCE_ID][i] if SOURCE_ID in batch else f"#{i} of the batch"
                out[EMBED_STATUS][i], out[EMBED_ERROR][i] = err.status, f"row {row}: {err}"
        if images:
            vectors = load_backend("encoders", self.encoder, device_for_rank(self.device, rank)).embed(images)
            for i, vector in zip(keep, np.asarray(vectors, dtype=np.float32)):
                out[EMBEDDING][i] = vector.tolist()
        return out


def _check_input(dataset: Dataset, config: EmbedConfig) -> None:
    if config.image_column not in dataset.column_names:
        raise ValueError(f"dataset has no image column {config.image_column!r}; columns: "
                         f"{', '.join(dataset.column_names)} (set EmbedConfig.image_column / --image-column)")


def output_features(dataset: Dataset) -> Features:
    """The embed stage's output features: the id/label columns the input has, then `EMBED_FEATURES`."""
    kept = Features({name: dataset.features[name] for name in KEEP_COLUMNS if name in dataset.column_names})
    return with_columns(kept, EMBED_FEATURES)


def run_embed(dataset: Dataset, config: EmbedConfig) -> tuple[Dataset, StageResult]:
    """Embed every image in memory, in this process (or ``num_proc`` map processes), through `map_stage`.

    Args:
        dataset: rows with an image column (any HF image dataset, a release's ``images`` config, ...).
        config: the encoder and batching.

    Returns:
        The rows: the kept id/label columns (``pair_id, role, label, category, source_id`` where present),
        ``embedding`` (float32 list; null for an unreadable image), ``image_digest``, ``embed_status`` and
        ``embed_error``; and the `StageResult` (status counts).

    Raises:
        ValueError: for a dataset without the image column.
    """
    _check_input(dataset, config)
    features = output_features(dataset)
    mapped, result = map_stage(
        dataset, EmbedTransform(config.encoder, config.image_column, config.device, config.max_pixels),
        stage=f"{STAGE} {config.encoder}",
        features=with_columns(dataset.features, EMBED_FEATURES), status_column=EMBED_STATUS,
        batch_size=config.batch_size, num_proc=config.num_proc,
    )
    return mapped.select_columns(list(features)), result


def load_images(path: str, split: str | None = None) -> Dataset:
    """Images (labelled or not) from a release (its ``images`` config), a run or saved folder, an image
    folder, or a hub dataset.

    Args:
        path: a release folder or ``ORG/NAME``, an embed/generate run folder, a ``save_to_disk``
            folder, an image folder with ``metadata.jsonl`` / ``.csv`` (read like a source: its
            ``rating`` / ``label`` column gives ``label``, and when any row has one, rows without
            are left out), or any dataset ``load_dataset`` reads.
        split: the split (default: test, else train, else the first; ``train`` for an image folder).

    Returns:
        The rows.

    Raises:
        ValueError: when ``path`` has neither an ``images`` nor a ``default`` config.
    """
    from safetypairs.engine.datafiles import RUN_FILE, is_saved_dataset, load_release, read_rows
    from safetypairs.evaluate.natural import labelled
    from safetypairs.sources import is_image_folder, load_source

    root = Path(path)
    if root.is_dir() and ((root / RUN_FILE).is_file() or is_saved_dataset(root)):
        return read_rows(root)
    if root.is_dir() and is_image_folder(root):
        rows = load_source(path, split or "train")
        return labelled(rows) if any(v in (SAFE, UNSAFE) for v in rows[SOURCE_LABEL]) else rows
    rows = load_release(path, "images", split or "auto")
    rows = rows if rows is not None else load_release(path, "default", split or "auto")
    if rows is None:
        raise ValueError(f"{path!r} has neither an 'images' nor a 'default' config")
    return rows


def load_embedded(path: str, encoder: str, split: str | None = None) -> Dataset:
    """`load_images`, refusing an embed run folder made with another encoder than ``encoder``.

    Raises:
        ValueError: when ``path`` is an embed run of a different encoder.
    """
    from safetypairs.engine.datafiles import RUN_FILE
    from safetypairs.engine.folders import read_json

    meta = read_json(Path(path) / RUN_FILE) if Path(path).is_dir() else None
    used = ((meta or {}).get("settings") or {}).get("encoder") if (meta or {}).get("stage") == STAGE else None
    if used is not None and used != encoder:
        raise ValueError(f"{path!r} holds embeddings of {used!r}, not {encoder!r}; embed it again or pass --encoder {used}")
    return load_images(path, split)


@dataclass(frozen=True)
class EmbedChunk:
    """The runner's ``compute(chunk rows, device)`` for the embed stage (picklable, plain config)."""

    config: EmbedConfig

    def __call__(self, rows: Dataset, device: str) -> tuple[Dataset, dict[str, dict[str, int]]]:
        """Embed one chunk on ``device``; returns the rows and ``{"embed": status histogram}``."""
        embedded, result = run_embed(rows, for_rank(self.config, device))  # checked once, not per chunk
        return embedded, {STAGE: result.statuses}


def embed_run(dataset: Dataset, config: EmbedConfig, run: Any) -> Any:
    """Embed through the shared runner: sharded over ``accelerate launch`` / ``torchrun`` ranks,
    resumable, and cached: a finished run folder with the same encoder, image column and input
    content is reused without a single encoder call.

    Args:
        dataset: rows with an image column.
        config: the encoder and batching (``num_proc`` is ignored: ranks come from the launcher).
        run: a `safetypairs.engine.runner.RunConfig` (output folder, chunk size, overwrite).

    Returns:
        The runner's `RunSummary` on rank 0, ``None`` on the other ranks. `datafiles.load_run(out)`
        reads the rows.

    Raises:
        ValueError: for a dataset without the image column.
    """
    _check_input(dataset, config)
    return run_stage(dataset, EmbedChunk(config), stage=STAGE, settings=config.settings(), run=run,
                     device=config.device, max_pixels=config.max_pixels)
