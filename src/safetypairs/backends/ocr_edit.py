"""The ``ocr-inpaint`` editor: find text with rapidocr, inpaint it away, draw the replacement."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from safetypairs.backends.options import Option
from safetypairs.backends.ocr import OCRConfig, TextBox, read_text
from safetypairs.backends.render import DEFAULT_FONT, TextStyle, draw_text
from safetypairs.instructions import text_replacements
from safetypairs.utils import Range, opencv

cv2 = opencv()

logger = logging.getLogger(__name__)


class EditError(RuntimeError):
    """The editor could not carry out an instruction on an image (the row gets ``edit_status=error``)."""


@dataclass(frozen=True)
class OCRInpaintOptions:
    """Settings of the ``ocr-inpaint`` editor (``ocr-inpaint:match=0.6,radius=5``); `OCRInpaintEditor.OPTIONS`
    declares each (help, range) with these defaults."""

    match: float = 0.6
    radius: int = 5
    grow: float = 0.12


def _similarity(a: str, b: str) -> float:
    norm = lambda s: " ".join(s.upper().split())  # noqa: E731
    return difflib.SequenceMatcher(None, norm(a), norm(b)).ratio()


def _line_mask(shape: tuple[int, int], lines: list[TextBox], grow: float) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for line in lines:
        cv2.fillPoly(mask, [np.round(np.array(line.quad)).astype(np.int32)], 255)
    height = max(line.bbox[3] - line.bbox[1] for line in lines)
    k = max(3, int(round(height * grow)) * 2 + 1)
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))


def _ink_style(original: np.ndarray, cleaned: np.ndarray, mask: np.ndarray, seed: int) -> TextStyle:
    """Estimate the text's fill (and outline) colour from pixels the inpainting changed most.

    k-means draws its initial centres from OpenCV's global generator: it is seeded from the row's
    seed right before the call, so the colours do not depend on what the process did earlier.
    """
    diff = np.abs(original.astype(np.int16) - cleaned.astype(np.int16)).sum(axis=2)
    ink = original[(mask > 0) & (diff > 60)].astype(np.float32)
    if len(ink) < 20:
        return TextStyle(font=DEFAULT_FONT)
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
    _, labels, centers = cv2.kmeans(ink, 2, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    counts = np.bincount(labels.ravel(), minlength=2)
    major, minor = int(np.argmax(counts)), int(np.argmin(counts))
    fill = tuple(int(c) for c in centers[major])
    contrast = abs(float(centers[major].mean()) - float(centers[minor].mean()))
    stroke = tuple(int(c) for c in centers[minor]) if counts[minor] > 0.2 * len(ink) and contrast > 80 else None
    return TextStyle(font=DEFAULT_FONT, fill=fill, stroke=stroke)


def replace_text(image: Image.Image, old: str, new: str, options: OCRInpaintOptions = OCRInpaintOptions(),
                 lines: list[TextBox] | None = None, seed: int = 0) -> Image.Image:
    """Remove the detected lines that read ``old`` and draw ``new`` in their place.

    Args:
        image: an RGB image.
        old: the text to find (the editor is not told where it is).
        new: the replacement text.
        options: matching and inpainting settings.
        lines: the OCR result for ``image``, when already computed.
        seed: the row's seed (the only source of randomness: OpenCV's k-means initialisation).

    Returns:
        A new image of the same size.

    Raises:
        EditError: when no detected line matches ``old``.
    """
    lines = read_text(image, OCRConfig()) if lines is None else lines
    targets = [ln for ln in lines if _similarity(ln.text, old) >= options.match]
    if not targets:
        found = " | ".join(ln.text for ln in lines) or "no text"
        raise EditError(f"text {old!r} not found in the image (detected: {found})")
    original = np.asarray(image.convert("RGB"))
    mask = _line_mask(original.shape[:2], targets, options.grow)
    cleaned = cv2.inpaint(original, mask, options.radius, cv2.INPAINT_TELEA)
    style = _ink_style(original, cleaned, mask, seed)
    result = Image.fromarray(cleaned)
    if new.strip():
        x0 = min(ln.bbox[0] for ln in targets)
        y0 = min(ln.bbox[1] for ln in targets)
        x1 = max(ln.bbox[2] for ln in targets)
        y1 = max(ln.bbox[3] for ln in targets)
        draw_text(result, new, (x0, y0, x1, y1), style)
    return result


class OCRInpaintEditor:
    """``ocr-inpaint[:match=..,radius=..,grow=..]``: carries out "Replace the text 'X' with 'Y'"
    instructions. rapidocr (real PP-OCR models) finds the text, OpenCV inpainting removes it and
    the replacement is drawn in the same box with the estimated text colour."""

    ARGUMENT = None
    OPTIONS = {
        "match": Option(float, "minimum similarity between a detected line and the text to replace",
                        OCRInpaintOptions.match, Range(0, 1)),
        "radius": Option(int, "OpenCV inpainting radius in pixels", OCRInpaintOptions.radius, Range(1)),
        "grow": Option(float, "how far the text mask is grown, as a share of the line height",
                       OCRInpaintOptions.grow, Range(0)),
    }
    takes_mask = False  # it finds the text itself

    def __init__(self, options: OCRInpaintOptions) -> None:
        self.options = options

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **options: Any) -> "OCRInpaintEditor":
        """Build from the options (`OPTIONS`, checked and cast by the registry); ``device`` is unused."""
        return cls(OCRInpaintOptions(**options))

    def edit(self, images: list[Image.Image], instructions: list[str], seeds: list[int],
             masks: list[Image.Image | None] | None = None) -> list[Image.Image]:
        """Apply each instruction to its image; each row's seed seeds its (only) random step, the colour k-means.

        Raises:
            ValueError: when masks are given (``takes_mask`` is False).
            EditError: for an instruction that is not a text replacement, or text not found.
        """
        if masks is not None and any(m is not None for m in masks):
            raise ValueError("ocr-inpaint takes no mask: it finds the text to replace itself")
        return [self._one(image, instruction, seed) for image, instruction, seed in zip(images, instructions, seeds)]

    def _one(self, image: Image.Image, instruction: str, seed: int) -> Image.Image:
        pairs = text_replacements(instruction)
        if not pairs:
            raise EditError(f"ocr-inpaint only carries out \"Replace the text 'X' with 'Y'\" instructions, got {instruction!r}")
        lines = read_text(image, OCRConfig())
        for old, new in pairs:
            image = replace_text(image, old, new, self.options, lines, seed)
        return image
