"""Validated candidate rows built from real skimage photos, for the release, card, builder and hub tests."""

from __future__ import annotations

import hashlib

import numpy as np
from datasets import Dataset
from PIL import Image, ImageDraw
from skimage import data as skdata

from safetypairs import schema as S

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "clock", "brick", "grass")
CATEGORIES = ("O1", "O2", "O6")
FEATURES = S.with_columns(
    S.with_columns(S.with_columns(S.SOURCE_FEATURES, S.INSTRUCT_FEATURES), S.EDIT_FEATURES), S.VALIDATION_FEATURES
)


def photo(name: str, size: int) -> Image.Image:
    """A real skimage photo as an RGB square of ``size`` pixels."""
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((size, size))


def digest(image: Image.Image) -> str:
    """Pixel digest of an image as RGB (same function in the subprocess round trip)."""
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def _candidate(source: int, cand: int, size: int) -> dict:
    orig = photo(PHOTOS[source % len(PHOTOS)], size)
    ImageDraw.Draw(orig).text((3, 3), f"BAD {source}", fill=(255, 0, 0))
    edited = orig.copy()
    ImageDraw.Draw(edited).rectangle((2, 2, size // 2, 14), fill=(40 * cand, 200, 40 * source % 255))
    control = orig.copy()
    control.putpixel((size - 1, size - 1), (cand, 1, 2))
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).rectangle((2, 2, size // 2, 14), fill=255)
    accepted = (source + cand) % 3 != 0
    lpips = 0.05 + 0.01 * ((source * 7 + cand * 3) % 5)
    return {
        S.SOURCE_ID: f"src-{source:03d}", S.IMAGE: orig, S.CATEGORY: CATEGORIES[source % len(CATEGORIES)],
        S.RATIONALE: "insulting caption", S.SOURCE_META: "{}", S.POLICY: "llavaguard@1",
        S.INSTRUCTION: f"Replace the text 'BAD {source}' with a kind phrase", S.ELEMENT: f"BAD {source}",
        S.INSTRUCTOR: "template", S.INSTRUCT_RAW: "", S.INSTRUCT_STATUS: "ok", S.INSTRUCT_ERROR: None,
        S.EDITED_IMAGE: edited, S.CONTROL_IMAGE: control if source % 4 else None, S.EDITOR: "ocr-inpaint@test",
        S.SEED: 100 + cand, S.CANDIDATE: cand, S.EDIT_STATUS: "ok", S.EDIT_ERROR: None, S.EDIT_MASK: mask,
        S.CHANGED_FRACTION: 0.1, S.CHANGE_BBOX: [2, 2, size // 2, 14], S.LPIPS_OUTSIDE: lpips, S.LPIPS_INSIDE: 0.5,
        S.SSIM_OUTSIDE: 0.95, S.PSNR_OUTSIDE: 40.0, S.CLIP_OUTSIDE: None, S.COLOR_CHANGE_INSIDE: 0.2,
        S.METRICS_RAN: ["ssim", "psnr"], S.JUDGE: "ocr-lexicon", S.JUDGE_ORIGINAL: "unsafe",
        S.JUDGE_EDITED: "safe" if accepted else "unsafe", S.JUDGE_ORIGINAL_RAW: "", S.JUDGE_EDITED_RAW: "",
        S.ACCEPTED: accepted, S.VALIDATE_STATUS: "ok", S.REJECT_REASON: None if accepted else "not_local",
    }


def validated_rows(n_sources: int = 9, candidates: int = 2, size: int = 64) -> Dataset:
    """Candidates for ``n_sources`` photos; each source has at least one accepted candidate when ``candidates`` >= 2."""
    rows = [_candidate(s, c, size) for s in range(n_sources) for c in range(candidates)]
    rows = [{name: row.get(name) for name in FEATURES} for row in rows]
    return Dataset.from_list(rows, features=FEATURES)
