"""Source datasets: the built-in offline demo (real photos + harassing captions) and user data."""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value, load_dataset
from datasets import Image as ImageFeature
from PIL import Image

from safetypairs import schema as S
from safetypairs.backends.render import FONTS, TextStyle, draw_text
from safetypairs.engine.datafiles import is_saved_dataset, load_checked, load_saved
from safetypairs.instructions import demo_text
from safetypairs.policy import is_none_category
from safetypairs.engine.stage import undecoded

logger = logging.getLogger(__name__)

# Real photos inside the scikit-image wheel (no download). Grayscale ones are converted to RGB.
DEMO_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
    "coins", "moon", "clock", "brick", "grass", "gravel", "stereo_motorcycle", "retina", "cell",
)
# (fill, stroke, band) colour schemes: meme white-on-black, yellow, black on a light band, ...
_SCHEMES = (
    ((255, 255, 255), (0, 0, 0), None),
    ((255, 230, 0), (0, 0, 0), None),
    ((20, 20, 20), None, (245, 245, 245)),
    ((255, 255, 255), None, (180, 20, 20)),
    ((230, 30, 30), (255, 255, 255), None),
    ((255, 255, 255), None, (25, 25, 25)),
    ((170, 170, 170), None, None),  # low contrast, no outline: hard for OCR and inpainting
)
# Other images in the wheel that no demo source, base image or pair uses: the held-out backgrounds of the
# demo's training eval set (photos of a scene in DEMO_PHOTOS, e.g. the right motorcycle view, are left out).
HELDOUT_PHOTOS = ("horse", "colorwheel", "shepp_logan_phantom", "logo", "microaneurysms", "checkerboard")
_POSITIONS = ("top", "bottom", "middle", "top", "bottom")
MAX_SIDE = 512
MIN_SIDE = 256  # smaller images are enlarged so a caption stays legible


@lru_cache(maxsize=len(DEMO_PHOTOS) + len(HELDOUT_PHOTOS))
def demo_photo(name: str) -> Image.Image:
    """An image from ``skimage.data`` as 8-bit RGB, longest side between 256 and 512 px.

    Raises:
        ValueError: for a name in neither `DEMO_PHOTOS` nor `HELDOUT_PHOTOS`.
    """
    if name not in DEMO_PHOTOS + HELDOUT_PHOTOS:
        raise ValueError(f"unknown demo photo {name!r}; allowed: {', '.join(DEMO_PHOTOS + HELDOUT_PHOTOS)}")
    import skimage.data

    arr = getattr(skimage.data, name)()
    arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)  # stereo pairs
    if arr.dtype == bool:
        arr = arr * 255
    elif arr.dtype.kind == "f":
        arr = 255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)
    image = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if max(image.size) < MIN_SIDE:
        scale = MIN_SIDE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def _caption_box(image: Image.Image, rng: random.Random) -> tuple[int, int, int, int]:
    w, h = image.size
    height = int(h * rng.uniform(0.06, 0.15))
    width = int(w * rng.uniform(0.55, 0.92))
    x0 = rng.randint(int(w * 0.03), w - width - int(w * 0.03))
    position = rng.choice(_POSITIONS)
    y0 = {"top": int(h * 0.04), "bottom": h - height - int(h * 0.05)}.get(position, (h - height) // 2)
    return x0, y0, x0 + width, y0 + height


def render_demo_row(index: int, seed: int, kind: str = "harassing", heldout: bool = False) -> dict:
    """Make one demo source row: a photo with a harassing (or, with ``kind="benign"``, a friendly)
    caption in a random style and place.

    Args:
        index: the row number (it picks the photo).
        seed: seed of the caption, style and place.
        kind: ``harassing`` or ``benign``.
        heldout: use `HELDOUT_PHOTOS` and the held-out captions, which no source, edit or base image uses.

    Returns:
        A row with ``source_id, image, category, rationale, source_meta`` (JSON with the text,
        the caption box, font and colours) and ``source_label``.

    Raises:
        ValueError: for a kind other than ``harassing`` or ``benign``.
    """
    if kind not in ("harassing", "benign"):
        raise ValueError(f"unknown caption kind {kind!r}; allowed: harassing, benign")
    rng = random.Random(f"{seed}:{index}")
    photos = HELDOUT_PHOTOS if heldout else DEMO_PHOTOS
    photo = photos[index % len(photos)]
    caption = rng.choice(demo_text()[f"heldout_{kind}" if heldout else kind])
    image = demo_photo(photo).copy()
    box = _caption_box(image, rng)
    fill, stroke, band = rng.choice(_SCHEMES)
    if band is not None:
        pad = max(2, (box[3] - box[1]) // 6)
        image.paste(band, (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad))
    style = TextStyle(font=rng.choice(FONTS), fill=fill, stroke=stroke)
    ink = draw_text(image, caption, box, style)
    meta = {"photo": photo, "text": caption, "box": list(ink), "font": style.font, "fill": fill, "stroke": stroke,
            "band": band}
    return {
        S.SOURCE_ID: f"demo-{index:04d}-{photo}",
        S.IMAGE: image,
        S.CATEGORY: "O1",
        S.RATIONALE: f"The caption '{caption}' insults the person, animal or thing shown." if kind == "harassing"
        else f"The caption '{caption}' is friendly.",
        S.SOURCE_META: json.dumps(meta),
        S.SOURCE_LABEL: S.UNSAFE if kind == "harassing" else S.SAFE,
    }


def build_demo_source(n: int = 24, seed: int = 0) -> Dataset:
    """The offline demo source: ``n`` real photos from ``skimage.data`` with harassing captions.

    Args:
        n: number of rows (photos are reused, with different captions and styles, past 16).
        seed: seed for captions, fonts, colours and placement.

    Returns:
        A dataset with `schema.SOURCE_FEATURES`.

    Raises:
        ValueError: when ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"the demo needs at least one source image, got n={n}")
    rows = [render_demo_row(i, seed) for i in range(n)]
    return Dataset.from_list(rows, features=S.SOURCE_FEATURES)


# Label columns read by default, in order: the schema's own, LlavaGuard's `rating`, UnsafeBench's `safety_label`.
LABEL_COLUMNS = (S.LABEL, "rating", "safety_label")
_SAFE_VALUES = {"safe": S.SAFE, "unsafe": S.UNSAFE, "0": S.SAFE, "1": S.UNSAFE, "false": S.SAFE, "true": S.UNSAFE}
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # an image folder's table of its images
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class SourceColumns:
    """Which columns of a source hold what (the CLI's ``--image-column`` ... ``--keep-columns``).

    Args:
        image: the image column.
        category: the policy category (a code ``O1``, ``"O1: <name>"``, a name or an alias; ``NA``
            and other "none applying" labels mark the row safe).
        rationale: why the image is unsafe (``""`` when the column is absent).
        id: a column of unique row ids; default: the image file's path relative to an image
            folder, else an existing ``source_id`` column, else the row index.
        label: a safe/unsafe column (``safe``/``unsafe`` in any case, 0/1, booleans); default: the
            first of `LABEL_COLUMNS` present; ``"none"`` reads no label. Safe rows are set aside.
        keep: columns copied into ``source_meta`` (JSON), which travels into the release.
        follow_links: read an image folder's files that are symbolic links to places outside it (refused by
            default: a folder's metadata must not pull other files into a release).
    """

    image: str = S.IMAGE
    category: str = S.CATEGORY
    rationale: str = S.RATIONALE
    id: str | None = None
    label: str | None = None
    keep: tuple[str, ...] = ()
    follow_links: bool = False


def load_source(spec: str, split: str = "train", columns: SourceColumns | None = None) -> Dataset:
    """Load source rows from an image folder, a saved dataset folder, parquet files or a hub dataset id.

    Args:
        spec: ``demo`` / ``demo:<n>``; a folder of images with ``metadata.jsonl`` or ``metadata.csv``
            (a ``file_name`` column with each image's relative path, plus category, rationale, ...);
            a folder written by ``save_to_disk``; a ``.parquet`` file, glob or folder; or a hub
            dataset id ``ORG/NAME``. A spec that is not ``ORG/NAME`` is never looked up on the hub.
        split: the split to read.
        columns: which columns hold the image, category, rationale, id and label (`SourceColumns`).

    Returns:
        Rows with ``source_id, image, category, rationale, source_meta, source_label`` (other
        columns kept).

    Raises:
        FileNotFoundError: for a local-looking spec that does not exist.
        ValueError: for a missing column, a bad label value, duplicate ids or a missing split.
    """
    if spec == "demo" or spec.startswith("demo:"):
        return build_demo_source(int(spec.partition(":")[2] or 24))
    columns = columns or SourceColumns()
    path = Path(spec).expanduser()
    if path.is_dir() and metadata_file(path) is not None:
        if split != "train":
            raise ValueError(f"an image folder has one split, 'train'; got split {split!r} for {spec!r}")
        dataset = read_image_folder(path, columns.image, columns.follow_links)
        return normalise_source(dataset, dataclasses.replace(columns, image=S.IMAGE), root=path.absolute(), name=spec)
    dataset, root = _read(spec, split)
    if hasattr(dataset, "keys"):  # a DatasetDict from load_from_disk
        if split not in dataset:
            raise ValueError(f"split {split!r} not in {spec!r}; available: {', '.join(dataset)}")
        dataset = dataset[split]
    return normalise_source(dataset, columns, root=root, name=spec)


def _read(spec: str, split: str) -> tuple[Any, Path | None]:
    """The raw dataset behind a spec and, for an image folder without metadata, its root (file paths become ids)."""
    path = Path(spec).expanduser()
    if is_saved_dataset(path):
        return load_saved(path), None
    if path.is_dir() and is_image_folder(path):
        return load_checked("imagefolder", data_dir=str(path), split=split), path.absolute()
    if path.is_dir():
        return load_checked(str(path), split=split), None
    if path.suffix.lower() == ".parquet" or (glob.has_magic(spec) and spec.endswith(".parquet")):
        if not glob.glob(str(path)):
            raise FileNotFoundError(f"source {spec!r}: no such parquet file")
        return load_checked("parquet", data_files=str(path), split="train"), None
    if path.exists() or not _HUB_ID.fullmatch(spec):
        raise FileNotFoundError(
            f"source {spec!r} is not a folder or .parquet file here (a hub dataset id looks like ORG/NAME; "
            "see `safetypairs generate --help` for the folder layouts)")
    return load_dataset(spec, split=split), None


def is_image_folder(path: Path) -> bool:
    """Images with a top-level metadata file (even beside a README), or a folder with no parquet and no card."""
    if metadata_file(path) is not None:
        return True
    return not any(path.glob("*.parquet")) and not any(path.glob("data/**/*.parquet")) and not (path / "README.md").exists()


def metadata_file(path: Path) -> Path | None:
    """An image folder's top-level ``metadata.jsonl`` (else ``metadata.csv``), or ``None``."""
    return next((path / name for name in METADATA_FILES if (path / name).is_file()), None)


def read_metadata(meta: Path) -> list[dict[str, Any]]:
    """The rows of a ``metadata.jsonl`` / ``.csv`` (a byte-order mark is ignored, as `datasets` does).

    Raises:
        ValueError: for an empty file or a line that is not a JSON object, naming the file and the line.
    """
    text = meta.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ValueError(f"{meta} is empty; it needs one row per image with the image's path (file_name)")
    if meta.suffix == ".csv":
        return [dict(row) for row in csv.DictReader(io.StringIO(text))]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta} line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{meta} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_image_folder(path: Path, image_column: str = S.IMAGE, follow_links: bool = False) -> Dataset:
    """An image folder with a top-level metadata file, read like `datasets`' imagefolder: one row per metadata row,
    its image in ``image`` (by path, decoded on access), the other columns as they are.

    The image's path relative to the folder is in ``file_name``, or in ``image_column`` (``--image-column``)
    when the metadata has no ``file_name`` (UnsafeBench names it ``image``). A path that leaves the folder
    (``..``, an absolute path, or a link to elsewhere unless ``follow_links``) or names no file is refused.

    Raises:
        ValueError: naming the file, the line and the reason.
    """
    meta = metadata_file(path)
    rows = read_metadata(meta)
    names = list(dict.fromkeys(k for row in rows for k in row))
    column = "file_name" if "file_name" in names else image_column if image_column in names else None
    if column is None:
        hint = "" if image_column == S.IMAGE else f" nor {image_column!r}"
        raise ValueError(f"{meta} has no 'file_name'{hint} column (the image's path relative to the folder); columns: "
                         f"{', '.join(names)}; pass --image-column NAME to name the column that holds it")
    root = path.resolve()
    files = [_image_path(root, meta, number, row.get(column), follow_links) for number, row in enumerate(rows, 1)]
    data: dict[str, list[Any]] = {S.IMAGE: files}
    for name in names:
        if name not in (column, S.IMAGE):
            data[name] = [_cell(row.get(name)) for row in rows]
    features = Features({S.IMAGE: ImageFeature(), **{n: _feature(v) for n, v in data.items() if n != S.IMAGE}})
    return Dataset.from_dict(data, features=features)


def _image_path(root: Path, meta: Path, number: int, value: Any, follow_links: bool) -> str:
    where = f"{meta} row {number}"
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: no image path ({value!r})")
    relative = Path(value.strip())
    lexical = Path(os.path.normpath(root / relative))
    candidate = lexical if follow_links else lexical.resolve()
    if relative.is_absolute() or not lexical.is_relative_to(root):
        raise ValueError(f"{where}: {value!r} leaves the folder {str(root)!r}; image paths must be relative to it")
    if not candidate.is_relative_to(root):
        raise ValueError(f"{where}: {value!r} leaves the folder {str(root)!r} through a link; pass --follow-links "
                         "to read it")
    if not candidate.is_file():
        raise ValueError(f"{where}: image file {value!r} does not exist in {str(root)!r}")
    return str(candidate)


def _cell(value: Any) -> Any:
    """A metadata value as one Arrow type can hold it: nested values as JSON text, ``""`` from a CSV as null."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return None if value == "" else value


def _feature(values: list[Any]) -> Value:
    """``string`` unless every value is a bool, an int or a float of one kind (then that type)."""
    kinds = {type(v) for v in values if v is not None}
    return Value({bool: "bool", int: "int64", float: "float64"}.get(kinds.pop(), "string") if len(kinds) == 1
                 else "float64" if kinds == {int, float} else "string")


def normalise_source(dataset: Dataset, columns: SourceColumns = SourceColumns(), *, root: Path | None = None,
                     name: str = "source") -> Dataset:
    """Map a dataset's own columns onto the source schema (`SourceColumns`), reading no image.

    Args:
        dataset: the rows as loaded.
        columns: which columns hold what.
        root: the image folder the rows came from (ids default to paths relative to it).
        name: how the source was named, for errors.

    Returns:
        The rows with ``source_id, image, category, rationale, source_meta, source_label``.

    Raises:
        ValueError: naming a missing column (and the columns there are), a bad label or duplicate ids.
    """
    names = dataset.column_names
    label = _label_column(columns, names)
    wanted = [("--image-column", columns.image), ("--id-column", columns.id), ("--label-column", label),
              *(("--keep-columns", k) for k in columns.keep)]
    missing = [f"{col!r} ({opt})" for opt, col in wanted if col is not None and col not in names]
    if missing:
        raise ValueError(f"source {name!r} has no column {', '.join(missing)}; its columns: {', '.join(names)}")
    table = {c: _plain(dataset, c) for c in {columns.category, columns.rationale, columns.id, label, S.SOURCE_META,
                                            S.SOURCE_ID, *LABEL_COLUMNS, *columns.keep} if c in names}
    n = len(dataset)
    ids = _ids(dataset, columns, table, root, n)
    category = [_text(v) for v in table.get(columns.category, [""] * n)]
    labels = [_label(v, label, i) for i, v in enumerate(table.get(label, [None] * n))]
    labels = [S.SAFE if not lab and is_none_category(cat) else lab for lab, cat in zip(labels, category)]
    meta = [_meta(table, label, columns.keep, i) for i in range(n)]
    new = {S.SOURCE_ID: ids, S.CATEGORY: category, S.RATIONALE: [_text(v) for v in table.get(columns.rationale, [""] * n)],
           S.SOURCE_META: meta, S.SOURCE_LABEL: labels}
    if columns.image != S.IMAGE:
        dataset = dataset.remove_columns([c for c in (S.IMAGE,) if c in names]).rename_column(columns.image, S.IMAGE)
    dataset = dataset.remove_columns([c for c in new if c in dataset.column_names])
    for column, values in new.items():
        dataset = dataset.add_column(column, values, feature=S.SOURCE_FEATURES[column])
    return dataset


def _plain(dataset: Dataset, column: str) -> list[Any]:
    """A non-image column's values, ClassLabel ints as their names."""
    values = dataset[column]
    feature = dataset.features[column]
    return [feature.int2str(v) if v is not None else None for v in values] if isinstance(feature, ClassLabel) else values


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _label_column(columns: SourceColumns, names: list[str]) -> str | None:
    if columns.label is not None:
        return None if columns.label.lower() == "none" else columns.label
    return next((c for c in LABEL_COLUMNS if c in names), None)


def _label(value: Any, column: str | None, row: int) -> str:
    """``unsafe``, ``safe`` or ``""`` (no value) from a label cell."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    key = str(int(value)) if isinstance(value, (bool, int, float, np.integer, np.bool_)) else str(value).strip().lower()
    if key not in _SAFE_VALUES:
        raise ValueError(f"label column {column!r}, row {row}: {value!r} is not a safety label; allowed: safe/unsafe "
                         "(any case), 0/1, true/false; pass --label-column NAME (or none) to read another column")
    return _SAFE_VALUES[key]


def _ids(dataset: Dataset, columns: SourceColumns, table: dict[str, list], root: Path | None, n: int) -> list[str]:
    if columns.id is not None:
        ids = [_text(v) for v in table[columns.id]]
    elif root is not None:
        cells = undecoded(dataset.select_columns([columns.image]))[columns.image]
        ids = [Path(os.path.relpath(cell["path"], root)).as_posix() for cell in cells]
    elif S.SOURCE_ID in table:
        ids = [_text(v) for v in table[S.SOURCE_ID]]
    else:
        return [f"{i:06d}" for i in range(n)]
    repeated = [k for k, c in Counter(ids).items() if c > 1 or not k]
    if repeated:
        raise ValueError(f"source ids must be unique and non-empty; repeated or empty: {repeated[:5]}; "
                         "pass --id-column NAME for a column of unique ids")
    return ids


def _meta(table: dict[str, list], label: str | None, keep: tuple[str, ...], i: int) -> str:
    """The row's provenance as JSON: the label column's value, the kept columns and any earlier source_meta."""
    meta = {}
    old = table.get(S.SOURCE_META, [None] * (i + 1))[i]
    if old:
        meta.update(json.loads(old) if str(old).startswith("{") else {S.SOURCE_META: old})
    for column in dict.fromkeys((label, *LABEL_COLUMNS, *keep)):
        if column in table:
            meta[column] = table[column][i]
    return json.dumps(meta, default=str, ensure_ascii=False) if meta else ""
