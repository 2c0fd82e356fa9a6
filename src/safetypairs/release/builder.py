"""The raw release layout (image files + ``metadata.jsonl``) and a `GeneratorBasedBuilder` that reads it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import DatasetDict

from safetypairs import schema as S
from safetypairs.identity import image_digests
from safetypairs.images import ImageError, image_format
from safetypairs.release.assemble import FEATURES, Release
from safetypairs.engine.stage import undecoded
from safetypairs.engine.folders import atomic_dir
from safetypairs.utils import progress

logger = logging.getLogger(__name__)

METADATA = {"pairs": "metadata.jsonl", "rejected": "rejected.jsonl"}  # images derive from pairs
SPLIT = "split"
IMAGE_FILES = {S.UNSAFE_IMAGE: "original", S.SAFE_IMAGE: "edited", S.CONTROL_IMAGE: "control", S.EDIT_MASK: "mask"}


def _save_image(cell: dict[str, Any] | None, folder: Path, stem: str, root: Path) -> str | None:
    """Write an undecoded image cell's bytes unchanged; return its path relative to ``root``."""
    if cell is None:
        return None
    try:
        fmt = image_format(cell).lower()
        data = cell.get("bytes") or Path(cell["path"]).read_bytes()
    except ImageError as err:
        logger.warning("%s/%s: %s; left out (null)", folder.name, stem, err)
        return None
    path = folder / f"{stem}.{'jpg' if fmt == 'jpeg' else fmt}"
    path.write_bytes(data)
    return path.relative_to(root).as_posix()


def _export_config(dd: DatasetDict, root: Path, name: str) -> int:
    """Write one config's rows as JSON lines plus image files; returns the number of rows."""
    image_cols = [c for c in IMAGE_FILES if c in FEATURES[name]]
    n = 0
    with open(root / METADATA[name], "w", encoding="utf-8") as meta:
        for split, ds in dd.items():
            for i, row in enumerate(progress(undecoded(ds), desc=f"export {name}/{split}", total=len(ds))):
                key = row[S.PAIR_ID] if name == "pairs" else f"{split}-{i:06d}"
                folder = root / "images" / name / key
                folder.mkdir(parents=True, exist_ok=True)
                for col in image_cols:
                    row[col] = _save_image(row[col], folder, IMAGE_FILES[col], root)
                meta.write(json.dumps({SPLIT: split, **row}, ensure_ascii=False) + "\n")
                n += 1
    return n


def export_raw(release: Release, raw_dir: str | Path) -> Path:
    """Write the raw, hand-editable layout of a release.

    ``metadata.jsonl`` holds one JSON line per pair (every ``pairs`` column, image columns as paths
    relative to ``raw_dir``, plus ``split``); ``rejected.jsonl`` the same for the ``rejected``
    config; image bytes are copied unchanged under ``images/<config>/<key>/``. Reviewers edit the
    JSON lines (fix a category, drop a pair) and `SafetyPairsRaw` / `load_raw` rebuild the configs.

    Args:
        release: an assembled release.
        raw_dir: the folder to write (created whole, or not at all; must be empty).

    Returns:
        ``raw_dir`` as a `Path`.

    Raises:
        OutputDirError: if ``raw_dir`` is not empty or not writable.
    """
    with atomic_dir(raw_dir, overwrite=False) as work:
        counts = {name: _export_config(release[name], work, name) for name in METADATA if name in release.configs}
    logger.info("raw layout written to %s: %s", raw_dir, counts)
    return Path(raw_dir)


class SafetyPairsRawConfig(datasets.BuilderConfig):
    """One release config (``pairs``, ``images`` or ``rejected``) read from the raw layout."""


class SafetyPairsRaw(datasets.GeneratorBasedBuilder):
    """Build the release configs from the raw layout written by `export_raw` (or edited by hand).

    Use it by instantiating it, not through a hub loading script::

        builder = SafetyPairsRaw(config_name="images", data_dir="raw/", cache_dir="cache/")
        builder.download_and_prepare()
        images = builder.as_dataset()
    """

    BUILDER_CONFIG_CLASS = SafetyPairsRawConfig
    BUILDER_CONFIGS = [SafetyPairsRawConfig(name=name, version=datasets.Version("1.0.0")) for name in FEATURES]
    DEFAULT_CONFIG_NAME = "pairs"

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """Build the Arrow files, rebuilt every time by default: the cache key cannot see hand edits of the
        layout, and the split sizes recorded by an earlier build are no check on an edited one."""
        kwargs.setdefault("download_mode", datasets.DownloadMode.FORCE_REDOWNLOAD)
        kwargs.setdefault("verification_mode", datasets.VerificationMode.NO_CHECKS)
        super().download_and_prepare(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="SafetyPairs counterfactual image pairs (arXiv 2510.21120), built from the raw layout.",
            features=FEATURES[self.config.name],
        )

    def _metadata_path(self) -> Path:
        if not self.config.data_dir:
            raise ValueError("SafetyPairsRaw needs data_dir= (a folder written by export_raw)")
        return Path(self.config.data_dir) / METADATA.get(self.config.name, METADATA["pairs"])

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        path = self._metadata_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a raw SafetyPairs layout")
        splits = list(dict.fromkeys(row[SPLIT] for _, row in raw_rows(path)))  # every line checked here, first
        return [datasets.SplitGenerator(name=s, gen_kwargs={"path": str(path), "split": s}) for s in splits]

    def _generate_examples(self, path: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        root = Path(path).resolve().parent
        features = FEATURES[self.config.name]
        for n, row in raw_rows(Path(path)):
            if row.pop(SPLIT) != split:
                continue
            for col in IMAGE_FILES:
                if row.get(col):
                    row[col] = _image_cell(root, row[col], f"{path} line {n + 1}, {col}")
            if self.config.name == "images":
                yield from _image_rows(row, n)
            else:
                yield str(n), {name: row.get(name) for name in features}


def raw_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line index, row)`` of a raw layout's metadata file, each line checked: a JSON object with a ``split``
    and image paths that stay inside the layout's folder.

    Raises:
        ValueError: naming the file and the line.
    """
    root = path.resolve().parent
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path} line {n + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get(SPLIT), str):
                raise ValueError(f"{where}: expected a JSON object with a {SPLIT!r} (e.g. \"test\")")
            for col in IMAGE_FILES:
                value = row.get(col)
                if value is not None and (not isinstance(value, str) or Path(value).is_absolute()
                                          or not (root / value).resolve().is_relative_to(root)):
                    raise ValueError(f"{where}: {col} {value!r} is not a path inside {str(root)!r}; image paths "
                                     "are relative to the layout's folder")
            yield n, row


def _image_cell(root: Path, relative: str, where: str) -> dict[str, Any] | None:
    """The image file's bytes as a cell, or ``None`` (with a warning naming it, never its content) when missing."""
    try:
        return {"path": None, "bytes": (root / relative).read_bytes()}
    except OSError as err:
        logger.warning("%s: cannot read %r (%s); the cell is null", where, relative, err.strerror or type(err).__name__)
        return None


def _image_rows(pair: dict[str, Any], n: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The ``images`` rows of one pair (same roles, labels, source id and pixel digests as `release.assemble`)."""
    roles = [(S.UNSAFE_IMAGE, S.UNSAFE, "original"), (S.SAFE_IMAGE, S.SAFE, "edited"),
             (S.CONTROL_IMAGE, S.UNSAFE, "control")]
    for col, label, role in roles:
        if pair.get(col) is not None:
            yield f"{n}-{role}", {S.IMAGE: pair[col], S.LABEL: label, S.CATEGORY: pair[S.CATEGORY],
                                  S.PAIR_ID: pair[S.PAIR_ID], S.ROLE: role,
                                  S.IMAGE_ID: S.image_id(pair[S.PAIR_ID], role),
                                  S.SOURCE_ID: pair.get(S.SOURCE_ID), S.IMAGE_DIGEST: image_digests([pair[col]])[0]}


def load_raw(raw_dir: str | Path, cache_dir: str | Path | None = None) -> Release:
    """Build every config present in a raw layout with `SafetyPairsRaw` into a `Release`.

    Args:
        raw_dir: a folder written by `export_raw` (possibly edited by hand).
        cache_dir: where the builder writes its Arrow files (default: the `datasets` cache).

    Returns:
        A `Release` ready for `release.publish.write_release` (its funnel is empty: the raw layout has none).
    """
    configs: dict[str, DatasetDict] = {}
    names = ["pairs", "images"] + (["rejected"] if (Path(raw_dir) / METADATA["rejected"]).is_file() else [])
    for name in names:
        builder = SafetyPairsRaw(config_name=name, data_dir=str(raw_dir),
                                 cache_dir=str(cache_dir) if cache_dir else None)
        builder.download_and_prepare()
        configs[name] = builder.as_dataset()
    return Release(configs)

