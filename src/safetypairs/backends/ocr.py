"""Text detection and recognition with rapidocr (PP-OCR ONNX models shipped inside its wheel)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from safetypairs.images import image_digest
from safetypairs.utils import LRU, Range, check_ranges, cpu_threads, opencv

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


# The allowed values of `OCRConfig`'s numbers (the ``ocr-lexicon`` guard declares its options with them).
OCR_RANGES = {"box_thresh": Range(0, 1), "text_score": Range(0, 1), "unclip_ratio": Range(0, open_low=True)}


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
        check_ranges("OCRConfig", dataclasses.asdict(self), OCR_RANGES)


@functools.lru_cache(maxsize=1)
def _engine():
    from rapidocr import RapidOCR

    opencv()  # rapidocr's pre- and post-processing run in OpenCV: keep its pool to the thread budget too
    # The angle classifier only matters for upside-down text; skipping it halves the time. The ONNX sessions keep to
    # the process's thread budget (OMP_NUM_THREADS) when one is set.
    params: dict[str, object] = {"Global.log_level": "error", "Global.use_cls": False}
    if threads := cpu_threads():
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
    return RapidOCR(params=params)


# What was read in the images seen last in this process, by (pixel digest, config): the stages of one process (a
# build, a notebook) read the same originals again (the instructor, the text editor, the judge, each OCR guard of
# an evaluation); a line list is a few hundred bytes, hashing a 1 MP image ~7 ms against ~0.3 s of OCR.
READ_CACHE = 4096
_read: LRU[tuple[TextBox, ...]] = LRU(READ_CACHE)
_read_lock = threading.Lock()


def read_text(image: Image.Image, config: OCRConfig = OCRConfig()) -> list[TextBox]:
    """Detect and recognise the lines of text in an image (once per pixels and settings in a process).

    Args:
        image: an RGB image.
        config: detector / recogniser settings.

    Returns:
        The lines found, top to bottom (empty when there is no text).
    """
    key = (image_digest(image), config)
    with _read_lock:
        found = _read.get(key)
    if found is None:
        found = tuple(_ocr(image, config))
        with _read_lock:
            _read.put(key, found)
    return list(found)


def _ocr(image: Image.Image, config: OCRConfig) -> list[TextBox]:
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
    return merge_rows(lines)


def merge_rows(lines: list[TextBox]) -> list[TextBox]:
    """Join pieces of one line of text that the detector split (same row, small horizontal gap).

    Returns:
        Lines sorted top to bottom; merged lines get the union box and the lowest score.
    """
    merged: list[TextBox] = []
    for line in sorted(lines, key=lambda ln: (ln.bbox[0], ln.bbox[1])):
        for k, row in enumerate(merged):
            if _same_row(row, line):
                x0, y0, x1, y1 = (min(row.bbox[0], line.bbox[0]), min(row.bbox[1], line.bbox[1]),
                                  max(row.bbox[2], line.bbox[2]), max(row.bbox[3], line.bbox[3]))
                quad = ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
                merged[k] = TextBox(f"{row.text} {line.text}", min(row.score, line.score), quad)
                break
        else:
            merged.append(line)
    return sorted(merged, key=lambda ln: (ln.bbox[1], ln.bbox[0]))


def _same_row(left: TextBox, right: TextBox) -> bool:
    """``right`` continues ``left``: their vertical extents overlap by half and the gap is small."""
    (_, ay0, ax1, ay1), (bx0, by0, _, by1) = left.bbox, right.bbox
    overlap = min(ay1, by1) - max(ay0, by0)
    height = max(ay1 - ay0, by1 - by0, 1)
    return overlap > 0.5 * min(ay1 - ay0, by1 - by0) and -0.5 * height <= bx0 - ax1 <= 1.5 * height
