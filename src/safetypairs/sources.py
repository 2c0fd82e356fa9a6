"""Source datasets: the built-in offline demo (real photos + harassing captions) and user data."""

from __future__ import annotations

import json
import logging
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image

from safetypairs import schema as S
from safetypairs.backends.render import FONTS, TextStyle, draw_text
from safetypairs.instructions import demo_text
from safetypairs.runner import is_saved_dataset, load_checked, load_saved

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
_POSITIONS = ("top", "bottom", "middle", "top", "bottom")
MAX_SIDE = 512


@lru_cache(maxsize=len(DEMO_PHOTOS))
def demo_photo(name: str) -> Image.Image:
    """A real photo from ``skimage.data`` as RGB, longest side at most 512 px.

    Raises:
        ValueError: for a name not in `DEMO_PHOTOS`.
    """
    if name not in DEMO_PHOTOS:
        raise ValueError(f"unknown demo photo {name!r}; allowed: {', '.join(DEMO_PHOTOS)}")
    import skimage.data

    arr = getattr(skimage.data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo pairs
    image = Image.fromarray(np.asarray(arr).astype(np.uint8)).convert("RGB")
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


def render_demo_row(index: int, seed: int, kind: str = "harassing") -> dict:
    """Make one demo source row: a photo with a harassing (or, with ``kind="benign"``, a friendly)
    caption in a random style and place.

    Returns:
        A row with ``source_id, image, category, rationale, source_meta`` (JSON with the text,
        the caption box, font and colours).

    Raises:
        ValueError: for a kind other than ``harassing`` or ``benign``.
    """
    if kind not in ("harassing", "benign"):
        raise ValueError(f"unknown caption kind {kind!r}; allowed: harassing, benign")
    rng = random.Random(f"{seed}:{index}")
    photo = DEMO_PHOTOS[index % len(DEMO_PHOTOS)]
    caption = rng.choice(demo_text()[kind])
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


def load_source(spec: str, split: str = "train") -> Dataset:
    """Load source rows from a saved dataset folder, a hub-layout/image folder or a hub dataset id.

    The result must have an ``image`` column; ``source_id`` (default: the row index),
    ``category`` and ``rationale`` (default: empty) are added when missing.

    Args:
        spec: ``demo`` / ``demo:<n>``, a folder written by ``save_to_disk``, a local folder
            ``load_dataset`` reads (parquet, an image folder with ``metadata.jsonl``/``.csv``), or a
            hub dataset id.
        split: the split to read.

    Returns:
        The source dataset.

    Raises:
        ValueError: when no image column is found, the split does not exist or a data file is corrupt.
        FileNotFoundError: for a folder without data.
    """
    if spec == "demo" or spec.startswith("demo:"):
        return build_demo_source(int(spec.partition(":")[2] or 24))
    path = Path(spec)
    if is_saved_dataset(path):
        dataset = load_saved(path)
    elif path.is_dir() and _is_image_folder(path):
        dataset = load_checked("imagefolder", data_dir=str(path), split=split)
    else:
        dataset = load_checked(spec, split=split)
    if hasattr(dataset, "keys"):  # a DatasetDict from load_from_disk
        if split not in dataset:
            raise ValueError(f"split {split!r} not in {spec!r}; available: {', '.join(dataset)}")
        dataset = dataset[split]
    return _normalise_source(dataset, spec)


def _is_image_folder(path: Path) -> bool:
    return not any(path.glob("*.parquet")) and not any(path.glob("data/**/*.parquet")) and not (path / "README.md").exists()


def _normalise_source(dataset: Dataset, spec: str) -> Dataset:
    if S.IMAGE not in dataset.column_names:
        raise ValueError(f"source {spec!r} has no {S.IMAGE!r} column; columns: {', '.join(dataset.column_names)}")
    if S.SOURCE_ID not in dataset.column_names:
        dataset = dataset.add_column(S.SOURCE_ID, [f"{i:06d}" for i in range(len(dataset))])
    for column in (S.CATEGORY, S.RATIONALE, S.SOURCE_META):
        if column not in dataset.column_names:
            dataset = dataset.add_column(column, [""] * len(dataset))
    return dataset
