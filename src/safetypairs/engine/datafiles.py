"""Parquet data files: written with checked, embedded images; read back from runs, saved datasets and hub layouts."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, Features, Image, load_dataset
from datasets.table import InMemoryTable, embed_table_storage
from datasets.utils.py_utils import convert_file_size_to_int

from safetypairs.engine.folders import partial_dir, read_json
from safetypairs.engine.imagechecks import ImageCheck, check, recorded
from safetypairs.images import DEFAULT_MAX_PIXELS, ImageError
from safetypairs.schema import IMAGE_CHECKS, IMAGE_CHECKS_FEATURES, with_columns

logger = logging.getLogger(__name__)
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?$", re.S | re.M)  # a card's YAML header

RUN_FILE = "run.json"
DATA_DIR = "data"
IMAGES_STATUS = "images"  # status histogram key of the image cells the writer nulled or reduced
ROW_GROUP_SIZE = 64  # rows per parquet row group: bounds memory with images


def write_parquet(dataset: Dataset, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                  known: Mapping[str, ImageCheck] | None = None, record: bool = False) -> dict[str, int]:
    """Write one parquet file with image bytes embedded, in row groups of `ROW_GROUP_SIZE` (flat memory).

    Every image cell is checked first (`imagechecks.check`), so what is written always decodes with
    `datasets`' default decoding (image columns are written as decoding ``Image()``): a cell that
    cannot be decoded within ``max_pixels`` becomes null (its bytes are not carried on; a warning
    names the row, the column and the cause), and one that only fits reduced is stored reduced, as
    PNG. A cell whose bytes a record proves (the rows' own ``image_checks`` column, or ``known``) is
    not decoded again.

    Args:
        dataset: the rows; its features (Image, ClassLabel) go into the schema metadata.
        path: the file to write.
        max_pixels: the pixel cap of a kept image cell.
        known: records of cells checked before (`imagechecks.recorded`), by bytes digest.
        record: write the ``image_checks`` column (the record of every image cell written, for the
            stages that read these rows); without it the column is left out.

    Returns:
        How many image cells were nulled or reduced, keyed ``"<column>: <unreadable|too_large|reduced>"``.
    """
    given = dataset.features  # a copy each time it is read
    images = [name for name, feature in given.items() if isinstance(feature, Image)]
    features = _written_features(given, record and bool(images))
    schema = features.arrow_schema
    counts: dict[str, int] = {}
    with pq.ParquetWriter(path, schema=schema) as writer:
        for table in dataset.with_format("arrow").iter(batch_size=ROW_GROUP_SIZE):
            table = _checked_images(table, images, max_pixels, known or {}, counts, IMAGE_CHECKS in features)
            writer.write_table(embed_table_storage(table.cast(schema)), row_group_size=ROW_GROUP_SIZE)
    return counts


def _written_features(features: Features, record: bool) -> Features:
    """``features`` as written: image columns decoding; ``image_checks`` last, and only when recording."""
    written = Features({name: Image() if isinstance(feature, Image) and not feature.decode else feature
                        for name, feature in features.items() if name != IMAGE_CHECKS})
    return with_columns(written, IMAGE_CHECKS_FEATURES) if record else written


def _checked_images(table: pa.Table, images: list[str], max_pixels: int, known: Mapping[str, ImageCheck],
                    counts: dict[str, int], record: bool) -> pa.Table:
    """``table`` with every image cell checked (unreadable -> null, oversized -> reduced) and, with ``record``,
    the ``image_checks`` of the cells kept; the rows' own records count as known."""
    if IMAGE_CHECKS in table.column_names:
        known = {**known, **recorded(table.column(IMAGE_CHECKS).to_pylist())}
        table = table.drop_columns([IMAGE_CHECKS])
    ids = next((table.column(c).to_pylist() for c in ("source_id", "pair_id") if c in table.column_names), None)
    found: list[list[dict[str, Any]]] = [[] for _ in range(table.num_rows)]
    for name in images:
        table = _checked_column(table, name, ids, max_pixels, known, counts, found)
    if not record:
        return table
    return table.append_column(IMAGE_CHECKS_FEATURES.arrow_schema.field(IMAGE_CHECKS),
                               pa.array(found, type=IMAGE_CHECKS_FEATURES.arrow_schema.field(IMAGE_CHECKS).type))


def _checked_column(table: pa.Table, name: str, ids: list[Any] | None, max_pixels: int,
                    known: Mapping[str, ImageCheck], counts: dict[str, int],
                    found: list[list[dict[str, Any]]]) -> pa.Table:
    """``table`` with the image column ``name`` checked cell by cell; each kept cell's record goes to ``found``."""
    cells = table.column(name).to_pylist()
    changed = False
    for i, cell in enumerate(cells):
        if cell is None or (cell.get("bytes") is None and cell.get("path") is None):
            continue
        try:
            checked, smaller = check(cell, max_pixels, known)
        except ImageError as err:
            row = repr(ids[i]) if ids else f"#{i} of its row group"
            logger.warning("row %s: column %r: %s; the cell is stored as null", row, name, err)
            cells[i], outcome = None, err.status
        else:
            if checked is not None:
                found[i].append(checked._asdict())
            if smaller is None:
                continue
            cells[i], outcome = {"bytes": smaller, "path": None}, "reduced"
        changed = True
        counts[f"{name}: {outcome}"] = counts.get(f"{name}: {outcome}", 0) + 1
    if not changed:
        return table
    index = table.column_names.index(name)
    return table.set_column(index, table.schema.field(index), pa.array(cells, type=table.schema.field(index).type))


def shards(dataset: Dataset, max_shard_size: int | str) -> Iterator[tuple[int, int, Dataset]]:
    """Contiguous shards of at most ~``max_shard_size`` bytes (of the rows' arrow data)."""
    nbytes = sum(table.nbytes for table in dataset.with_format("arrow").iter(batch_size=1000))
    n = max(1, int(nbytes / convert_file_size_to_int(max_shard_size)) + 1)
    n = min(n, max(1, len(dataset)))
    for index in range(n):
        yield index, n, dataset.shard(num_shards=n, index=index, contiguous=True)


def data_files(out_dir: Path, config_name: str, split: str) -> list[Path]:
    """The parquet shards of one config and split in a release folder, sorted."""
    return sorted((out_dir / "data" / config_name).glob(f"{split}-*.parquet"))


# ----------------------------------------------------------------------------- reading what runs wrote


@dataclass(frozen=True)
class DataFiles:
    """The parquet data files of one table (a run's merged ``data/``), read only when asked."""

    paths: tuple[Path, ...]

    def rows(self) -> Dataset:
        """The rows, read into memory (no `datasets` cache is built): for small tables such as predictions.

        Raises:
            ValueError: when a file is corrupt (named).
        """
        tables = []
        for path in self.paths:
            try:
                tables.append(pq.read_table(path))
            except (pa.ArrowException, OSError) as err:
                raise ValueError(f"corrupt or truncated parquet file {str(path)!r}: {err}") from None
        return Dataset(InMemoryTable(pa.concat_tables(tables)))


def load_run(out: str | Path) -> Dataset:
    """Load the merged rows of a finished run (``out/data/*.parquet``) as one `datasets.Dataset`.

    Raises:
        FileNotFoundError: when the run has no merged data (unfinished, or not a run folder) or a data
            file its ``run.json`` lists is missing.
        ValueError: when a data file is corrupt (named).
    """
    listed = [str(Path(out) / f) for f in (read_json(Path(out) / RUN_FILE) or {}).get("files", [])]
    missing = [f for f in listed if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"data file {missing[0]!r} of the run {str(out)!r} is missing ({len(missing)} of "
                                f"{len(listed)} listed in {RUN_FILE})")
    found = sorted(str(p) for p in (Path(out) / DATA_DIR).glob("train-*.parquet"))
    if not found:
        hint = f"; an unfinished run resumes from {str(partial_dir(Path(out)))!r}" if partial_dir(Path(out)).is_dir() else ""
        raise FileNotFoundError(f"no merged data in {str(Path(out) / DATA_DIR)!r}; has the run finished?{hint}")
    return load_checked("parquet", data_files=found, split="train")


def load_checked(path: str, *args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset` on local input, with a corrupt file reported as one error naming it.

    Args:
        path, *args, **kwargs: as for `datasets.load_dataset` (``data_files`` or a local folder give
            the parquet files checked).

    Returns:
        What `datasets.load_dataset` returns.

    Raises:
        ValueError: naming a corrupt or unreadable parquet file, or saying what could not be read.
        FileNotFoundError: when there are no data files.
    """
    from datasets.exceptions import DatasetGenerationError

    if Path(path).is_dir() and "data_dir" not in kwargs and "data_files" not in kwargs:
        # a local folder by its own files: `datasets` caches a folder under its base name and config alone,
        # so two folders named alike (two runs' "release/") would give the first one's rows
        name = args[0] if args else kwargs.pop("name", None)
        path, args, kwargs = "parquet", (), {**kwargs, "data_files": local_data_files(Path(path), name)}
    files = kwargs.get("data_files") or []
    if isinstance(files, dict):
        files = [f for split_files in files.values() for f in split_files]
    files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    for file in files:  # footers first: a truncated or foreign file fails here, cheaply, named
        _check_parquet(file, footer_only=True)
    try:
        return load_dataset(path, *args, **kwargs)
    except DatasetGenerationError as err:
        for file in files:  # name the file whose data cannot be read
            _check_parquet(file, footer_only=False)
        cause = err.__cause__ or err
        raise ValueError(f"cannot read {path!r}: {type(cause).__name__}: {cause}") from None


def load_release(path: str, config: str = "pairs", split: str | None = "auto", **kwargs: Any) -> Any:
    """One config of a release (a hub-layout folder or ``ORG/NAME``): the one way the house loads a release.

    Args:
        path: the release folder or hub repo id.
        config: ``pairs``, ``images``, ``rejected`` (or ``default`` for a plain dataset).
        split: a split name, ``"auto"`` (``test`` if present, else ``train``, else the first), or ``None``
            for every split (a `DatasetDict`).
        **kwargs: passed to `datasets.load_dataset` (``token``, ``revision``, ``cache_dir``...).

    Returns:
        The `Dataset` (or `DatasetDict`), or ``None`` when the release has no such config.

    Raises:
        ValueError: for a split the config does not have, or a corrupt data file (named).
    """
    import datasets

    if config not in datasets.get_dataset_config_names(path, **{k: v for k, v in kwargs.items() if k == "token"}):
        logger.info("release %s has no %r config", path, config)
        return None
    loaded = load_checked(path, config, **kwargs)
    if split is None or not isinstance(loaded, DatasetDict):
        return loaded
    if split == "auto":
        split = next((s for s in ("test", "train") if s in loaded), next(iter(loaded)))
    if split not in loaded:
        raise ValueError(f"split {split!r} not in {path}; available: {', '.join(loaded)}")
    return loaded[split]


def local_data_files(folder: Path, name: str | None = None) -> dict[str, list[str]]:
    """The parquet files of one config of a local folder, by split, as `datasets` would resolve them.

    The README's YAML ``configs`` decide (``name``, else the ``default: true`` config, else the first);
    without them every ``*.parquet`` below the folder, split by a ``<split>-`` file-name prefix
    (``train`` when there is none).

    Raises:
        ValueError: for a config the README does not declare.
        FileNotFoundError: when the folder holds no parquet file.
    """
    configs = _readme_configs(folder)
    if configs:
        chosen = next((c for c in configs if c.get("config_name") == name), None) if name else \
            next((c for c in configs if c.get("default")), configs[0])
        if chosen is None:
            raise ValueError(f"{str(folder)!r} has no config {name!r}; it declares "
                             f"{', '.join(str(c.get('config_name')) for c in configs)}")
        found = {split: sorted(str(f) for pattern in patterns for f in folder.glob(pattern))
                 for split, patterns in _declared_files(folder, chosen).items()}
    else:
        found = {}
        for file in sorted(folder.rglob("*.parquet")):
            prefix = file.name.split("-", 1)[0] if "-" in file.name else "train"
            found.setdefault(prefix if prefix.isidentifier() else "train", []).append(str(file))
    found = {split: files for split, files in found.items() if files}
    if not found:
        raise FileNotFoundError(f"{str(folder)!r} holds no parquet files" + (f" for config {name!r}" if name else ""))
    return found


def _declared_files(folder: Path, config: dict[str, Any]) -> dict[str, list[str]]:
    """Split -> the file patterns a README config declares, each checked to stay inside ``folder``.

    Raises:
        ValueError: for a malformed entry or a pattern that is absolute or leaves the folder, naming it.
    """
    declared = config.get("data_files") or []
    if isinstance(declared, str):
        declared = [{"split": "train", "path": declared}]
    where = f"{str(folder / 'README.md')!r}, config {config.get('config_name')!r}"
    out: dict[str, list[str]] = {}
    for entry in declared if isinstance(declared, list) else [declared]:
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{where}: data_files entry {entry!r} needs a 'path' (and a 'split')")
        patterns = [entry["path"]] if isinstance(entry["path"], str) else list(entry["path"])
        for pattern in patterns:
            if not isinstance(pattern, str) or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
                raise ValueError(f"{where}: data file pattern {pattern!r} must be a path relative to the release "
                                 "folder, inside it")
        out.setdefault(str(entry.get("split", "train")), []).extend(patterns)
    return out


def _readme_configs(folder: Path) -> list[dict[str, Any]]:
    """The ``configs`` list of a folder's README.md YAML header (empty without one)."""
    import yaml

    readme = folder / "README.md"
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8-sig")
    front = _FRONT_MATTER.match(text)  # whole '---' lines: a title like "SafetyPairs---v2" is not a delimiter
    if front is None:
        return []
    header = front.group(1)
    try:
        configs = (yaml.safe_load(header) or {}).get("configs") or []
    except yaml.YAMLError as err:
        raise ValueError(f"unreadable YAML header in {str(readme)!r}: {err}") from None
    return [c for c in configs if isinstance(c, dict)]


def _check_parquet(file: str, footer_only: bool) -> None:
    try:
        if footer_only:
            pq.read_metadata(file)
            return
        for _ in pq.ParquetFile(file).iter_batches(batch_size=ROW_GROUP_SIZE):
            pass
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"corrupt or truncated parquet file {file!r}: {err}") from None


def load_saved(path: str | Path) -> Any:
    """`datasets.load_from_disk`, with an incomplete or corrupt folder reported as one error naming it.

    Raises:
        ValueError: when the folder cannot be read.
    """
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except (KeyError, IndexError, TypeError, ValueError, pa.ArrowException) as err:  # what a broken state.json,
        raise ValueError(f"cannot read the save_to_disk folder {str(path)!r}; it is empty, incomplete or corrupt "
                         f"({type(err).__name__}: {err})") from None  # a missing or bad .arrow file raise


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return any((Path(path) / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json"))


def read_rows(path: str | Path) -> Dataset:
    """Read the rows a stage wrote, whatever the writer.

    Args:
        path: a run folder (``run.json`` + ``data/*.parquet``), a folder written by
            `Dataset.save_to_disk`, or a folder of parquet files / a hub layout (all splits are
            concatenated).

    Returns:
        The rows.

    Raises:
        FileNotFoundError: if ``path`` is not a folder or holds none of these.
        ValueError: if a data file is corrupt (named).
    """
    from datasets import DatasetDict, concatenate_datasets

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"input {str(root)!r} is not a folder")
    if (root / RUN_FILE).is_file():
        return load_run(root)
    if is_saved_dataset(root):
        loaded = load_saved(root)
    elif (root / "README.md").is_file() or any(root.rglob("*.parquet")):
        loaded = load_checked(str(root))
    else:
        raise FileNotFoundError(f"{str(root)!r} holds no run, save_to_disk dataset or parquet files")
    return concatenate_datasets(list(loaded.values())) if isinstance(loaded, DatasetDict) else loaded
