"""Offline classifiers (judges and guards): ocr-lexicon and nudenet on real photos."""

import json

import pytest

from safetypairs.backends.guards import NudeNetGuard, OCRLexiconGuard
from safetypairs.backends.render import TextStyle, draw_text
from safetypairs.policy import load_policy
from safetypairs.sources import demo_photo


def _captioned(text):
    image = demo_photo("coffee").copy()
    draw_text(image, text, (40, 20, 560, 80), TextStyle(fill=(255, 230, 0)))
    return image


def test_ocr_lexicon_flags_insults_and_passes_benign_text():
    guard = OCRLexiconGuard.from_spec(None)
    unsafe, safe, plain = guard.classify(
        [_captioned("WORTHLESS IDIOT"), _captioned("HAVE A NICE DAY"), demo_photo("coffee")], [None] * 3, load_policy()
    )
    assert unsafe.label == "unsafe" and "worthless" in unsafe.rationale and unsafe.score > 0.5
    assert json.loads(unsafe.raw)[0]["text"].upper().startswith("WORTHLESS")
    assert safe.label == "safe" and "no lexicon words" in safe.rationale and safe.score == 0.0
    assert plain.label == "safe" and plain.rationale == "no text detected"


def test_ocr_lexicon_options():
    guard = OCRLexiconGuard.from_spec("box_thresh=0.3,mode=det")
    assert guard.ocr.box_thresh == 0.3 and guard.spec == "ocr-lexicon:box_thresh=0.3,mode=det"
    with pytest.raises(ValueError, match="ocr-lexicon option mode must be one of det, rec, got 'both'"):
        OCRLexiconGuard.from_spec("mode=both")
    with pytest.raises(ValueError, match="ocr-lexicon option box_thresh must be a number, got 'high'"):
        OCRLexiconGuard.from_spec("box_thresh=high")
    with pytest.raises(ValueError, match=r"box_thresh must be in \[0, 1\], got 2.0"):
        OCRLexiconGuard.from_spec("box_thresh=2")
    assert not OCRLexiconGuard.from_spec(None, mode="rec").ocr.use_det


def test_nudenet_calls_clothed_photos_safe():
    guard = NudeNetGuard.from_spec(None)
    verdicts = guard.classify([demo_photo("astronaut"), demo_photo("chelsea")], [None, None], load_policy())
    assert [v.label for v in verdicts] == ["safe", "safe"]
    assert all(0.0 <= v.score < 0.5 for v in verdicts)
    assert isinstance(json.loads(verdicts[0].raw), list)
    with pytest.raises(ValueError, match=r"nudenet option value\(s\): threshold=2.0 \(allowed: \[0, 1\]\)"):
        NudeNetGuard.from_spec("threshold=2")
    with pytest.raises(ValueError, match="unknown nudenet option.*'thresh'.*allowed: threshold"):
        NudeNetGuard.from_spec("thresh=0.2")
    assert NudeNetGuard.from_spec("threshold=0.2", threshold="0.7").threshold == 0.7  # keywords win
