"""Calibration of the validation thresholds: real photos with local edits and global changes.

``python -m benchmarks.calibration [--lpips SPEC] [--clip SPEC]`` prints the measured table.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from safetypairs import schema as S
from safetypairs.backends.render import TextStyle, draw_text

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")  # colour photos (recolour)
LOCAL_CASES = ("paste_object", "paste_object_jpeg90", "inpaint_region", "replace_text")
GLOBAL_CASES = ("brightness", "contrast", "blur", "jpeg_q10", "translate_3px", "crop_resize", "recolour")
IDENTICAL_CASES = ("identical",)
# What each case must get: "accept" or the reasons that count as a correct rejection.
EXPECTED = {
    **{c: ("accept",) for c in LOCAL_CASES},
    **{c: ("not_local", "background_changed") for c in GLOBAL_CASES},
    "identical": ("no_change",),
}


@dataclass(frozen=True)
class CalibrationPair:
    """One measured case: a photo, what was done to it and the two images."""

    photo: str
    case: str
    original: Image.Image
    edited: Image.Image


def _photo(name: str) -> Image.Image:
    from safetypairs.sources import demo_photo

    return demo_photo(name)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _paste(image: Image.Image) -> Image.Image:
    """Paste a patch of another photo (the cat's face) into the upper right of the image."""
    w, h = image.size
    side = int(0.22 * min(w, h))
    patch = _photo("chelsea").crop((140, 40, 300, 200)).resize((side, side), Image.Resampling.LANCZOS)
    out = image.copy()
    out.paste(patch, (int(0.65 * w), int(0.15 * h)))
    return out


def _inpaint(image: Image.Image) -> Image.Image:
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


def _replace_text(photo: Image.Image) -> tuple[Image.Image, Image.Image]:
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


def _translate(image: Image.Image, px: int = 3) -> Image.Image:
    arr = np.asarray(image)
    shift = np.float32([[1, 0, px], [0, 1, px]])
    return Image.fromarray(cv2.warpAffine(arr, shift, image.size, borderMode=cv2.BORDER_REPLICATE))


def _crop_resize(image: Image.Image, share: float = 0.04) -> Image.Image:
    w, h = image.size
    box = (int(share * w), int(share * h), w - int(share * w), h - int(share * h))
    return image.crop(box).resize(image.size, Image.Resampling.BICUBIC)


def _recolour(image: Image.Image, degrees: int = 20) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(degrees * 255 / 360)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


_GLOBAL: dict[str, Callable[[Image.Image], Image.Image]] = {
    "brightness": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "contrast": lambda im: ImageEnhance.Contrast(im).enhance(1.25),
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "jpeg_q10": lambda im: _jpeg(im, 10),
    "translate_3px": _translate,
    "crop_resize": _crop_resize,
    "recolour": _recolour,
    "identical": lambda im: im.copy(),
}


def calibration_pairs(photos: Sequence[str] = PHOTOS) -> list[CalibrationPair]:
    """Build every calibration case on every photo.

    Args:
        photos: ``skimage.data`` photo names.

    Returns:
        One `CalibrationPair` per (photo, case).
    """
    pairs = []
    for name in photos:
        photo = _photo(name)
        captioned, replaced = _replace_text(photo)
        pairs += [
            CalibrationPair(name, "paste_object", photo, _paste(photo)),
            CalibrationPair(name, "paste_object_jpeg90", photo, _jpeg(_paste(photo), 90)),
            CalibrationPair(name, "inpaint_region", photo, _inpaint(photo)),
            CalibrationPair(name, "replace_text", captioned, replaced),
        ]
        pairs += [CalibrationPair(name, case, photo, fn(photo)) for case, fn in _GLOBAL.items()]
    return pairs


_COLUMNS = (S.CHANGED_FRACTION, S.CHANGE_SPREAD, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE, S.LPIPS_OUTSIDE, S.CLIP_OUTSIDE,
            S.LPIPS_INSIDE, S.COLOR_CHANGE_INSIDE)


def measure(pairs: list[CalibrationPair], config=None) -> list[dict]:
    """Validate every calibration pair and return one row of metrics and decision per pair.

    Args:
        pairs: from `calibration_pairs`.
        config: a `ValidateConfig` (default thresholds and no judge when ``None``).

    Returns:
        Dicts with ``photo, case, expected, accepted, reject_reason, ok`` and the metric columns.
    """
    from datasets import Dataset

    from safetypairs.validate import ValidateConfig, validate_pairs

    config = replace(config or ValidateConfig(), judge=None)
    data = Dataset.from_dict({S.IMAGE: [p.original for p in pairs], S.EDITED_IMAGE: [p.edited for p in pairs]},
                             features=S.Features({S.IMAGE: S.Image(), S.EDITED_IMAGE: S.Image()}))
    out = validate_pairs(data, config).remove_columns([S.IMAGE, S.EDITED_IMAGE, S.EDIT_MASK])
    rows = []
    for pair, row in zip(pairs, out):
        verdict = "accept" if row[S.ACCEPTED] else row[S.REJECT_REASON]
        rows.append({"photo": pair.photo, "case": pair.case, "expected": " or ".join(EXPECTED[pair.case]),
                     "decision": verdict, "ok": verdict in EXPECTED[pair.case],
                     **{c: row[c] for c in _COLUMNS}})
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def summarize(rows: list[dict]) -> str:
    """A markdown table: per case, the min..max of each metric over the photos and the decisions made."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    header = ["case", "expected", *(c.replace("_outside", "_out").replace("_inside", "_in") for c in _COLUMNS), "decisions"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        sel = [r for r in rows if r["case"] == case]
        cells = [case, sel[0]["expected"]]
        for col in _COLUMNS:
            vals = [r[col] for r in sel if r[col] is not None]
            cells.append(f"{_fmt(min(vals))}..{_fmt(max(vals))}" if vals else "-")
        decisions = sorted({r["decision"] for r in sel})
        cells.append(",".join(decisions) + ("" if all(r["ok"] for r in sel) else "  <-- WRONG"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the calibration table (optionally with LPIPS / CLIP encoders)."""
    from safetypairs.validate import ValidateConfig

    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__)
    parser.add_argument("--lpips", help="LPIPS encoder spec, e.g. lpips:alex")
    parser.add_argument("--clip", help="CLIP encoder spec, e.g. open_clip:ViT-B-32/openai")
    parser.add_argument("--photos", nargs="*", default=list(PHOTOS), help="skimage.data photo names")
    args = parser.parse_args(argv)
    rows = measure(calibration_pairs(args.photos), ValidateConfig(lpips=args.lpips, clip=args.clip))
    sys.stdout.write(summarize(rows) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
