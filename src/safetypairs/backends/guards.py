"""Offline classifier backends shared by the ``judges`` and ``guards`` registries."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

import numpy as np
from PIL import Image

from safetypairs.backends.options import cast_options, parse_options
from safetypairs.backends.base import Verdict
from safetypairs.backends.ocr import OCRConfig, read_text
from safetypairs.policy import Policy
from safetypairs.schema import SAFE, UNSAFE
from safetypairs.utils import Range

logger = logging.getLogger(__name__)


class OCRLexiconGuard:
    """``ocr-lexicon[:box_thresh=..,text_score=..,unclip_ratio=..,mode=det|rec]``.

    Reads the text in an image with rapidocr and calls it unsafe when a word of the policy's
    lexicon (any category's) appears. ``mode=rec`` runs the recogniser alone on the whole image,
    an independent configuration from the detector + recogniser default.
    """

    OPTIONS = {
        "box_thresh": "text detector box score threshold (0..1)",
        "text_score": "minimum recognition score of a text line (0..1)",
        "unclip_ratio": "how far detected text boxes are grown",
        "mode": "det (detector + recogniser, default) or rec (recogniser alone on the whole image)",
    }

    builds_cheaply = True  # from_spec loads no model: checking options is building it

    def __init__(self, ocr: OCRConfig, spec: str) -> None:
        self.ocr = ocr
        self.spec = spec

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **options: object) -> "OCRLexiconGuard":
        """Build from ``key=value`` options (in the spec argument or as keywords, which win);
        ``device`` is unused (ONNX on CPU).

        Raises:
            ValueError: for unknown options or bad values, naming the allowed ones.
        """
        spec = "ocr-lexicon" + (f":{arg}" if arg else "")
        types = {"box_thresh": float, "text_score": float, "unclip_ratio": float, "mode": ("det", "rec")}
        values = cast_options("ocr-lexicon", {**parse_options(arg), **options}, types)
        use_det = values.pop("mode", "det") == "det"
        config = dataclasses.replace(OCRConfig(), use_det=use_det, **values)  # OCRConfig checks the ranges
        return cls(config, spec)

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
    from nudenet import NudeDetector

    return NudeDetector()


class NudeNetGuard:
    """``nudenet[:threshold=0.5]``: the NudeNet ONNX detector shipped in its wheel; unsafe when an
    exposed-body-part class is detected above the threshold (it only sees nudity)."""

    OPTIONS = {"threshold": "detector score (0..1) from which an exposed body part counts (default 0.5)"}

    builds_cheaply = True  # from_spec loads no model: checking options is building it

    def __init__(self, threshold: float, spec: str) -> None:
        self.threshold = threshold
        self.spec = spec

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **options: object) -> "NudeNetGuard":
        """Build from the spec argument or keyword options (these win).

        Raises:
            ValueError: for unknown options or a threshold outside [0, 1].
        """
        values = cast_options("nudenet", {**parse_options(arg), **options}, {"threshold": float},
                              {"threshold": Range(0, 1)})
        return cls(values.get("threshold", 0.5), "nudenet" + (f":{arg}" if arg else ""))

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
