"""Calibration table of the validation thresholds: known local edits and global changes on real photos,
optionally through a simulated editor fingerprint (applied to the control and to every edit).

``python -m benchmarks.calibration [--fingerprint mild|strong|resample] [--reference control|original]
[--thresholds pixel-exact|latent-diffusion|FILE] [--lpips SPEC] [--clip SPEC]`` prints the measured table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from safetypairs import schema as S
from safetypairs.validate.calibrate import EXPECTED, jpeg, known_edits, outcome

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")  # colour photos (recolour)


def _gamma(image: Image.Image, gamma: float) -> Image.Image:
    lut = [min(255, round(255 * (v / 255) ** gamma)) for v in range(256)] * 3
    return image.point(lut)


def _resample(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    small = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BICUBIC)


# Deterministic stand-ins for a latent editor's whole-frame re-render (a VAE round trip is stronger still).
FINGERPRINTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda im: im,
    "mild": lambda im: jpeg(_gamma(im.filter(ImageFilter.GaussianBlur(0.7)), 0.97), 60),
    "strong": lambda im: jpeg(_gamma(im.filter(ImageFilter.GaussianBlur(1.2)), 0.92), 40),
    "resample": lambda im: _resample(im, 0.5),
}


@dataclass(frozen=True)
class CalibrationPair:
    """One measured case: a photo, what was done to it, the two images and the editor's control."""

    photo: str
    case: str
    original: Image.Image
    edited: Image.Image
    control: Image.Image | None = None


def _photo(name: str) -> Image.Image:
    from safetypairs.sources import demo_photo

    return demo_photo(name)


def calibration_pairs(photos: Sequence[str] = PHOTOS, fingerprint: str = "none") -> list[CalibrationPair]:
    """Build every calibration case on every photo, through a simulated editor fingerprint.

    Args:
        photos: ``skimage.data`` photo names.
        fingerprint: a key of `FINGERPRINTS`; unless ``none``, the edit is ``fp(edited)`` and the
            control ``fp(original)`` (what an editor that re-renders every pixel returns).

    Returns:
        One `CalibrationPair` per (photo, case).
    """
    fp = FINGERPRINTS[fingerprint]
    pairs = []
    for name in photos:
        for case, original, edited in known_edits(_photo(name)):
            control = None if fingerprint == "none" else fp(original)
            pairs.append(CalibrationPair(name, case, original, fp(edited), control))
    return pairs


_COLUMNS = (S.CHANGED_FRACTION, S.CHANGE_ELEMENT, S.CHANGE_SPREAD, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE,
            S.LPIPS_OUTSIDE, S.CLIP_OUTSIDE, S.LPIPS_INSIDE, S.COLOR_CHANGE_INSIDE, S.NOISE_FLOOR_PSNR)


def measure(pairs: list[CalibrationPair], config=None) -> list[dict]:
    """Validate every calibration pair and return one row of metrics and decision per pair.

    Args:
        pairs: from `calibration_pairs`.
        config: a `ValidateConfig` (default thresholds and no judge when ``None``).

    Returns:
        Dicts with ``photo, case, expected, decision, ok`` and the metric columns.
    """
    from datasets import Dataset

    from safetypairs.validate.stage import ValidateConfig, validate_pairs

    config = replace(config or ValidateConfig(), judge=None)
    columns = {S.IMAGE: [p.original for p in pairs], S.EDITED_IMAGE: [p.edited for p in pairs],
               S.CONTROL_IMAGE: [p.control for p in pairs]}
    data = Dataset.from_dict(columns, features=S.Features({k: S.Image() for k in columns}))
    out = validate_pairs(data, config).remove_columns([*columns, S.EDIT_MASK])
    rows = []
    for pair, row in zip(pairs, out):
        decision = outcome(row)
        rows.append({"photo": pair.photo, "case": pair.case, "expected": " or ".join(EXPECTED[pair.case]),
                     "decision": decision, "ok": decision in EXPECTED[pair.case], **{c: row[c] for c in _COLUMNS}})
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def summarize(rows: list[dict]) -> str:
    """A markdown table: per case, the min..max of each metric over the photos and the decisions made."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    short = [c.replace("_outside", "_out").replace("_inside", "_in").replace("_fraction", "") for c in _COLUMNS]
    header = ["case", "expected", *short, "decisions"]
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
    """Print the calibration table (optionally through a fingerprint, with LPIPS / CLIP encoders)."""
    from safetypairs.validate.stage import ValidateConfig

    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__)
    parser.add_argument("--fingerprint", choices=list(FINGERPRINTS), default="none")
    parser.add_argument("--reference", choices=["auto", "control", "original"], default="auto")
    parser.add_argument("--thresholds", default=None, help="preset name or thresholds file (default: pixel-exact)")
    parser.add_argument("--lpips", help="LPIPS encoder spec, e.g. lpips:alex")
    parser.add_argument("--clip", help="CLIP encoder spec, e.g. open_clip:ViT-B-32/openai")
    parser.add_argument("--photos", nargs="*", default=list(PHOTOS), help="skimage.data photo names")
    args = parser.parse_args(argv)
    config = ValidateConfig(lpips=args.lpips, clip=args.clip, reference=args.reference, thresholds=args.thresholds)
    rows = measure(calibration_pairs(args.photos, args.fingerprint), config)
    sys.stdout.write(summarize(rows) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
