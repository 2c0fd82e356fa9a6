"""Per-editor calibration: known local edits and global changes through the user's editor -> a thresholds file."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageEnhance, ImageFilter

from safetypairs import schema as S
from safetypairs.backends.render import TextStyle, draw_text
from safetypairs.images import load_image
from safetypairs.instructions import NOOP_INSTRUCTION
from safetypairs.backends.registry import load_backend, parse_spec
from safetypairs.validate.thresholds import (
    Thresholds,
    load_thresholds,
    preset_for_editor,
    thresholds_for,
    write_thresholds,
)
from safetypairs.utils import device_for_rank, opencv, progress
from safetypairs.validate.decision import decide_pixels
from safetypairs.validate.stage import ValidateConfig, validate_pairs

cv2 = opencv()

logger = logging.getLogger(__name__)

# --- known edits ------------------------------------------------------------------------------


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """``image`` after a JPEG round trip at ``quality``."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def paste(image: Image.Image) -> Image.Image:
    """Paste a patch of another photo (the cat's face) into the upper right of the image."""
    from safetypairs.sources import demo_photo

    w, h = image.size
    side = int(0.22 * min(w, h))
    patch = demo_photo("chelsea").crop((140, 40, 300, 200)).resize((side, side), Image.Resampling.LANCZOS)
    out = image.copy()
    out.paste(patch, (int(0.65 * w), int(0.15 * h)))
    return out


def inpaint(image: Image.Image) -> Image.Image:
    """Remove a central rectangle (12% x 18% of the frame) with OpenCV inpainting."""
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[int(0.40 * h):int(0.58 * h), int(0.44 * w):int(0.56 * w)] = 255
    return Image.fromarray(cv2.inpaint(arr, mask, 5, cv2.INPAINT_TELEA))


def _caption_box(image: Image.Image) -> tuple[int, int, int, int]:
    w, h = image.size
    return (int(0.1 * w), int(0.78 * h), int(0.9 * w), int(0.9 * h))


def with_caption(image: Image.Image, text: str = "YOU ARE WORTHLESS TRASH") -> Image.Image:
    """The photo with a meme-style caption near the bottom (the 'unsafe' original)."""
    out = image.copy()
    draw_text(out, text, _caption_box(out), TextStyle())
    return out


def replace_text(photo: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Caption the photo, then inpaint the caption's ink and draw a benign phrase in its box.

    Returns:
        ``(captioned original, edited)``.
    """
    captioned = with_caption(photo)
    arr = np.asarray(captioned)
    ink = (np.abs(arr.astype(np.int16) - np.asarray(photo, dtype=np.int16)).sum(axis=2) > 0).astype(np.uint8)
    ink = cv2.dilate(ink * 255, np.ones((5, 5), np.uint8))
    out = Image.fromarray(cv2.inpaint(arr, ink, 5, cv2.INPAINT_TELEA))
    draw_text(out, "HAVE A LOVELY SUNNY DAY", _caption_box(out), TextStyle())
    return captioned, out


def remove_thin_object(photo: Image.Image) -> tuple[Image.Image, Image.Image]:
    """A thin object (an antenna: 2 px wide, 16% of the short side long) drawn on the photo, then inpainted away.

    Returns:
        ``(original with the antenna, edited without it)``.
    """
    arr = np.asarray(photo).copy()
    h, w = arr.shape[:2]
    length = max(8, round(0.16 * min(w, h)))
    x, y = int(0.3 * w), int(0.25 * h)
    line = np.zeros((h, w), np.uint8)
    cv2.line(line, (x, y), (x + length // 4, y + length), 255, 2)
    arr[line > 0] = (20, 20, 20) if arr[line > 0].mean() > 100 else (235, 235, 235)
    ink = cv2.dilate(line, np.ones((3, 3), np.uint8))
    return Image.fromarray(arr), Image.fromarray(cv2.inpaint(arr, ink, 3, cv2.INPAINT_TELEA))


def translate(image: Image.Image, px: int = 3) -> Image.Image:
    """``image`` shifted by ``px`` pixels right and down (border replicated)."""
    arr = np.asarray(image)
    shift = np.float32([[1, 0, px], [0, 1, px]])
    return Image.fromarray(cv2.warpAffine(arr, shift, image.size, borderMode=cv2.BORDER_REPLICATE))


def crop_resize(image: Image.Image, share: float = 0.04) -> Image.Image:
    """Crop ``share`` off every side and scale back up (a zoom)."""
    w, h = image.size
    box = (int(share * w), int(share * h), w - int(share * w), h - int(share * h))
    return image.crop(box).resize(image.size, Image.Resampling.BICUBIC)


def recolour(image: Image.Image, degrees: int = 20) -> Image.Image:
    """Rotate every hue by ``degrees``."""
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(degrees * 255 / 360)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


LOCAL: dict[str, Callable[[Image.Image], tuple[Image.Image, Image.Image]]] = {
    "paste_object": lambda im: (im, paste(im)),
    "paste_object_jpeg90": lambda im: (im, jpeg(paste(im), 90)),
    "inpaint_region": lambda im: (im, inpaint(im)),
    "replace_text": replace_text,
    "remove_thin_object": remove_thin_object,
}
GLOBAL: dict[str, Callable[[Image.Image], Image.Image]] = {
    "brightness": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "contrast": lambda im: ImageEnhance.Contrast(im).enhance(1.25),
    "saturation": lambda im: ImageEnhance.Color(im).enhance(1.4),
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "jpeg_q10": lambda im: jpeg(im, 10),
    "translate_3px": translate,
    "crop_resize": crop_resize,
    "recolour": recolour,
}
IDENTICAL = "identical"
# What each case must get: "accept" or the reasons that count as a correct rejection.
EXPECTED: dict[str, tuple[str, ...]] = {
    **{c: ("accept",) for c in LOCAL},
    **{c: ("not_local", "background_changed") for c in GLOBAL},
    IDENTICAL: ("no_change",),
}


def known_edits(photo: Image.Image) -> list[tuple[str, Image.Image, Image.Image]]:
    """Every calibration case on one photo.

    Args:
        photo: an RGB image.

    Returns:
        ``(case, original, edited)`` for each key of `EXPECTED`.
    """
    cases = [(name, *make(photo)) for name, make in LOCAL.items()]
    cases += [(name, photo, change(photo)) for name, change in GLOBAL.items()]
    return cases + [(IDENTICAL, photo, photo.copy())]


def outcome(row: dict[str, Any]) -> str:
    """``accept`` for an accepted row, else its reject reason (what `EXPECTED` lists per case)."""
    return "accept" if row[S.ACCEPTED] else row[S.REJECT_REASON]


# --- calibration through an editor -------------------------------------------------------------

_MARGINS = {"min_ssim_outside": 0.02, "min_psnr_outside": 1.5, "max_change_spread": 0.1,
            "max_lpips_outside": 0.02, "min_clip_outside": 0.02}
_FITTED = {  # threshold -> (metric column, direction: "min" = values must stay above it)
    "min_ssim_outside": (S.SSIM_OUTSIDE, "min"), "min_psnr_outside": (S.PSNR_OUTSIDE, "min"),
    "max_change_spread": (S.CHANGE_SPREAD, "max"), "max_lpips_outside": (S.LPIPS_OUTSIDE, "max"),
    "min_clip_outside": (S.CLIP_OUTSIDE, "min"),
}


@dataclass(frozen=True)
class CalibrateConfig:
    """Settings of ``safetypairs calibrate``.

    Attributes:
        editor: the ``editors`` spec to calibrate (the one ``generate`` will use).
        editor_options: extra ``(key, value)`` options for the editor backend.
        base: the preset the fit starts from (its ``mask_delta_e`` and caps are kept); ``None`` = by editor.
        seed: seed of every editor call (control and edits of one image share it).
        device: ``auto`` or a torch device.
        batch_size: images per editor call.
        lpips / clip: encoders to measure (their thresholds are fitted when they run).
    """

    editor: str
    editor_options: tuple[tuple[str, Any], ...] = ()
    base: str | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 4
    lpips: str | None = None
    clip: str | None = None

    def __post_init__(self) -> None:
        parse_spec("editors", self.editor)
        load_thresholds(self.base or preset_for_editor(self.editor))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class CalibrationResult:
    """What `calibrate` measured and fitted.

    Attributes:
        thresholds: the fitted values.
        rows: per (image, case): ``image, case, expected, decision, ok`` and the metric columns.
        unseparated: cases no box of thresholds can decide correctly (also in the log).
    """

    thresholds: Thresholds
    rows: list[dict[str, Any]]
    unseparated: list[str]


def edited_cases(images: Sequence[Image.Image], config: CalibrateConfig) -> Dataset:
    """Every known edit of every image and its original, both through the editor with the no-op instruction.

    Args:
        images: the user's RGB images.
        config: the editor and seed.

    Returns:
        Rows with ``source_id`` (image index), ``case``, ``image`` (the case's original),
        ``edited_image`` (editor(edited case)), ``control_image`` (editor(original)) and ``editor``.
    """
    editor = load_backend("editors", config.editor, device_for_rank(config.device, None),
                          **dict(config.editor_options))
    rows: dict[str, list] = {k: [] for k in (S.SOURCE_ID, "case", S.IMAGE, S.EDITED_IMAGE, S.CONTROL_IMAGE)}
    for index, image in enumerate(progress(images, desc="calibrate")):
        cases = known_edits(load_image(image))
        inputs = [img for _, original, edited in cases for img in (original, edited)]
        outputs: list[Image.Image] = []
        for start in range(0, len(inputs), config.batch_size):
            chunk = inputs[start:start + config.batch_size]
            outputs += editor.edit(chunk, [NOOP_INSTRUCTION] * len(chunk), [config.seed] * len(chunk))
        for k, (case, original, _) in enumerate(cases):
            for key, value in zip(rows, (str(index), case, original, outputs[2 * k + 1], outputs[2 * k])):
                rows[key].append(value)
    features = Features({S.SOURCE_ID: Value("string"), "case": Value("string"), S.IMAGE: ImageFeature(),
                         S.EDITED_IMAGE: ImageFeature(), S.CONTROL_IMAGE: ImageFeature()})
    data = Dataset.from_dict(rows, features=features)
    return data.add_column(S.EDITOR, [config.editor] * len(data))


def fit_thresholds(rows: list[dict[str, Any]], base: Thresholds) -> Thresholds:
    """Thresholds that accept every local case and reject every global one, with a margin.

    Each fitted threshold sits halfway between the worst local value and the nearest global value
    beyond it (or a fixed margin past the worst local value when no global value is beyond it);
    ``min_element_fraction`` sits halfway between the identical case and the smallest local change.
    ``mask_delta_e`` and ``max_changed_fraction`` (a policy cap, raised only to fit a local case)
    come from ``base``, since the metrics were measured with them.

    Args:
        rows: measured rows with ``case`` and the metric columns.
        base: the preset the metrics were measured under.

    Returns:
        The fitted thresholds (a global case inside every local range stays accepted: see `calibrate`).
    """
    local = [r for r in rows if EXPECTED[r["case"]] == ("accept",)]
    changes = [r for r in rows if r["case"] in GLOBAL]
    values: dict[str, Any] = {}
    for name, (column, direction) in _FITTED.items():
        ours = [r[column] for r in local if r[column] is not None]
        if not ours:
            values[name] = getattr(base, name)
            continue
        sign = 1 if direction == "min" else -1  # work as "values must stay above"
        worst = min(sign * v for v in ours)
        beyond = [sign * r[column] for r in changes if r[column] is not None and sign * r[column] < worst]
        edge = (worst + max(beyond)) / 2 if beyond else worst - _MARGINS[name]
        values[name] = sign * edge
    values["max_change_spread"] = min(1.0, max(values["max_change_spread"], 1e-3))
    values["min_ssim_outside"] = max(-1.0, values["min_ssim_outside"])
    values["min_psnr_outside"] = max(0.0, values["min_psnr_outside"])
    noise = max([r[S.CHANGE_ELEMENT] for r in rows if r["case"] == IDENTICAL] or [0.0])
    smallest = min(r[S.CHANGE_ELEMENT] for r in local) if local else base.min_element_fraction
    values["min_element_fraction"] = (noise + smallest) / 2
    biggest = max((r[S.CHANGED_FRACTION] for r in local), default=0.0)
    values["max_changed_fraction"] = min(1.0, max(base.max_changed_fraction, biggest * 1.1))
    return replace(base, **values)


def calibrate(images: Sequence[Image.Image], config: CalibrateConfig) -> CalibrationResult:
    """Run the known edits through the editor, measure them against the control and fit thresholds.

    Args:
        images: the user's images (a handful of typical ones is enough: 16 cases each).
        config: the editor and measurement settings.

    Returns:
        The fitted thresholds, the per-case table decided with them, and the cases they cannot separate.
    """
    base_name = config.base or preset_for_editor(config.editor)
    measure = ValidateConfig(reference="control", thresholds=base_name, lpips=config.lpips, clip=config.clip,
                             device=config.device)
    data = edited_cases(images, config)
    measured = validate_pairs(data, measure).remove_columns([S.IMAGE, S.EDITED_IMAGE, S.CONTROL_IMAGE, S.EDIT_MASK])
    rows = measured.to_list()
    thresholds = fit_thresholds(rows, thresholds_for(measure, config.editor)[1])
    table = []
    for row in rows:
        reason = decide_pixels(thresholds, row)[0]
        decision = "accept" if reason is None else reason
        table.append({"image": row[S.SOURCE_ID], "case": row["case"], "expected": " or ".join(EXPECTED[row["case"]]),
                      "decision": decision, "ok": decision in EXPECTED[row["case"]],
                      **{c: row[c] for c in _TABLE_COLUMNS}})
    unseparated = sorted({f"{r['case']} (image {r['image']})" for r in table if not r["ok"]})
    if unseparated:
        logger.warning("calibration cannot decide every case correctly: %s", ", ".join(unseparated))
    return CalibrationResult(thresholds, table, unseparated)


_TABLE_COLUMNS = (S.CHANGED_FRACTION, S.CHANGE_ELEMENT, S.CHANGE_SPREAD, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE,
                  S.LPIPS_OUTSIDE, S.CLIP_OUTSIDE, S.NOISE_FLOOR_PSNR)


def run_calibrate(source: str, out: str | Path, config: CalibrateConfig, *, n: int = 8,
                  split: str = "train") -> CalibrationResult:
    """``safetypairs calibrate``: calibrate on the first ``n`` images of a source and write the thresholds file.

    Args:
        source: a source spec (`sources.load_source`: hub id, dataset or image folder, ``demo[:n]``).
        out: the thresholds YAML to write (``validate --thresholds`` loads it).
        config: the editor and measurement settings.
        n: images to use.
        split: the source split.

    Returns:
        The `CalibrationResult` (the file holds its thresholds and a summary).
    """
    from safetypairs.sources import load_source

    data = load_source(source, split=split)
    images = [load_image(cell) for cell in data.select(range(min(n, len(data))))[S.IMAGE]]
    result = calibrate(images, config)
    cases = {case: sorted({r["decision"] for r in result.rows if r["case"] == case})
             for case in dict.fromkeys(r["case"] for r in result.rows)}
    write_thresholds(out, result.thresholds, editor=config.editor, base=config.base or preset_for_editor(config.editor),
                     source=source, images=len(images), seed=config.seed, decisions=cases,
                     unseparated=result.unseparated)
    return result
