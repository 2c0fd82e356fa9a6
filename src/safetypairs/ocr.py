"""Text detection and recognition with rapidocr (PP-OCR ONNX models shipped inside its wheel)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextBox:
    """One detected line of text: its string, recognition score and quadrilateral (4 x,y points)."""

    text: str
    score: float
    quad: tuple[tuple[float, float], ...]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Axis-aligned ``(x0, y0, x1, y1)`` around the quadrilateral."""
        xs, ys = [p[0] for p in self.quad], [p[1] for p in self.quad]
        return int(min(xs)), int(min(ys)), int(round(max(xs))), int(round(max(ys)))


@dataclass(frozen=True)
class OCRConfig:
    """rapidocr settings.

    Args:
        box_thresh: detector box threshold (PP-OCR default 0.5).
        text_score: drop recognised lines scoring below this.
        unclip_ratio: how far detected boxes are grown around the text.
        use_det: ``False`` runs the recogniser alone on the whole image (one line).
    """

    box_thresh: float = 0.5
    text_score: float = 0.5
    unclip_ratio: float = 1.6
    use_det: bool = True

    def __post_init__(self) -> None:
        for name in ("box_thresh", "text_score"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"OCRConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.unclip_ratio <= 0:
            raise ValueError(f"OCRConfig.unclip_ratio must be > 0, got {self.unclip_ratio}")


@functools.lru_cache(maxsize=1)
def _engine():
    from rapidocr import RapidOCR

    # The angle classifier only matters for upside-down text; skipping it halves the time.
    return RapidOCR(params={"Global.log_level": "warning", "Global.use_cls": False})


def read_text(image: Image.Image, config: OCRConfig = OCRConfig()) -> list[TextBox]:
    """Detect and recognise the lines of text in an image.

    Args:
        image: an RGB image.
        config: detector / recogniser settings.

    Returns:
        The lines found, top to bottom (empty when there is no text).
    """
    arr = np.asarray(image.convert("RGB"))[:, :, ::-1]  # rapidocr expects BGR like OpenCV
    out = _engine()(
        np.ascontiguousarray(arr),
        use_det=config.use_det,
        use_cls=False,
        text_score=config.text_score,
        box_thresh=config.box_thresh,
        unclip_ratio=config.unclip_ratio,
    )
    txts = getattr(out, "txts", None) or ()
    scores = getattr(out, "scores", None) or ()
    if not config.use_det:
        h, w = image.height, image.width
        full = ((0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h)))
        return [TextBox(t, float(s), full) for t, s in zip(txts, scores) if t and s >= config.text_score]
    boxes = getattr(out, "boxes", None)
    if boxes is None:
        return []
    lines = [
        TextBox(text, float(score), tuple((float(x), float(y)) for x, y in quad))
        for text, score, quad in zip(txts, scores, boxes)
        if text.strip()
    ]
    return sorted(lines, key=lambda line: (line.bbox[1], line.bbox[0]))
