"""Offline classifier backends shared by the ``judges`` and ``guards`` registries."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from safetypairs.backends.base import Verdict
from safetypairs.backends.ocr import OCR_RANGES, OCRConfig, read_text
from safetypairs.backends.options import Option
from safetypairs.policy import Policy
from safetypairs.schema import SAFE, UNSAFE
from safetypairs.utils import Range, cpu_threads

logger = logging.getLogger(__name__)


class OCRLexiconGuard:
    """``ocr-lexicon[:box_thresh=..,text_score=..,unclip_ratio=..,mode=det|rec]``.

    Reads the text in an image with rapidocr and calls it unsafe when a word of the policy's
    lexicon (any category's) appears. ``mode=rec`` runs the recogniser alone on the whole image,
    an independent configuration from the detector + recogniser default.
    """

    ARGUMENT = None
    OPTIONS = {
        "box_thresh": Option(float, "text detector box score threshold", OCRConfig.box_thresh,
                             OCR_RANGES["box_thresh"]),
        "text_score": Option(float, "minimum recognition score of a text line", OCRConfig.text_score,
                             OCR_RANGES["text_score"]),
        "unclip_ratio": Option(float, "how far detected text boxes are grown", OCRConfig.unclip_ratio,
                               OCR_RANGES["unclip_ratio"]),
        "mode": Option(("det", "rec"), "det: detector + recogniser; rec: the recogniser alone on the whole image",
                       "det"),
    }

    def __init__(self, ocr: OCRConfig) -> None:
        self.ocr = ocr

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **options: Any) -> "OCRLexiconGuard":
        """Build from the options (`OPTIONS`, checked and cast by the registry); ``device`` is unused (ONNX on CPU)."""
        mode = options.pop("mode")
        return cls(OCRConfig(use_det=mode == "det", **options))

    def classify(self, images: list[Image.Image], categories: list[str | None], policy: Policy) -> list[Verdict]:
        """Label each image ``unsafe`` when its text contains a lexicon word of ``policy``."""
        return [self._one(image, policy) for image in images]

    def _one(self, image: Image.Image, policy: Policy) -> Verdict:
        lines = read_text(image, self.ocr)
        raw = json.dumps([{"text": ln.text, "score": round(ln.score, 4), "bbox": ln.bbox} for ln in lines])
        if not lines:
            return Verdict(SAFE, 0.0, "no text detected", raw)
        hits = [(ln, policy.lexicon_matches(ln.text)) for ln in lines]
        flagged = [(ln, words) for ln, words in hits if words]
        text = " | ".join(ln.text for ln in lines)
        if not flagged:
            return Verdict(SAFE, 0.0, f"no lexicon words in text {text!r}", raw)
        words = sorted({w for _, ws in flagged for w in ws})
        score = max(ln.score for ln, _ in flagged)
        return Verdict(UNSAFE, score, f"lexicon words {', '.join(words)} in text {text!r}", raw)


# NudeNet's classes that count as nudity under a policy's O4 "should not" list.
EXPOSED_CLASSES = frozenset(
    {"FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED"}
)


@functools.lru_cache(maxsize=1)
def _nudenet_detector():
    import nudenet
    import onnxruntime

    model = str(Path(nudenet.__file__).with_name("320n.onnx"))  # the detector NudeDetector() loads by default
    detector = nudenet.NudeDetector(model_path=model)
    if threads := cpu_threads():  # NudeDetector takes no session options: the same model again, within the budget
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        detector.onnx_session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return detector


class NudeNetGuard:
    """``nudenet[:threshold=0.5]``: the NudeNet ONNX detector shipped in its wheel; unsafe when an
    exposed-body-part class is detected above the threshold (it only sees nudity)."""

    ARGUMENT = None
    OPTIONS = {"threshold": Option(float, "detector score from which an exposed body part counts", 0.5, Range(0, 1))}

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **options: Any) -> "NudeNetGuard":
        """Build from the options (`OPTIONS`, checked and cast by the registry); ``device`` is unused (ONNX on CPU)."""
        return cls(options["threshold"])

    def classify(self, images: list[Image.Image], categories: list[str | None], policy: Policy) -> list[Verdict]:
        """Label each image ``unsafe`` when NudeNet finds an exposed body part."""
        detector = _nudenet_detector()
        verdicts = []
        for image in images:
            bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
            found = detector.detect(bgr)
            exposed = [d for d in found if d["class"] in EXPOSED_CLASSES]
            score = max((float(d["score"]) for d in exposed), default=0.0)
            raw = json.dumps([{"class": d["class"], "score": round(float(d["score"]), 4)} for d in found])
            if score >= self.threshold:
                names = sorted({d["class"] for d in exposed if d["score"] >= self.threshold})
                verdicts.append(Verdict(UNSAFE, score, f"exposed: {', '.join(names)}", raw))
            else:
                verdicts.append(Verdict(SAFE, score, f"no exposed body parts above {self.threshold}", raw))
        return verdicts
