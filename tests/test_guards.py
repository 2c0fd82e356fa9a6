"""Offline classifiers (judges and guards): ocr-lexicon and nudenet on real photos."""

import json

import pytest

from safetypairs.backends.registry import build_backend
from safetypairs.backends.render import TextStyle, draw_text
from safetypairs.policy import load_policy
from safetypairs.sources import demo_photo


def _captioned(text):
    image = demo_photo("coffee").copy()
    draw_text(image, text, (40, 20, 560, 80), TextStyle(fill=(255, 230, 0)))
    return image


def test_ocr_lexicon_flags_insults_and_passes_benign_text():
    guard = build_backend("guards", "ocr-lexicon")
    unsafe, safe, plain = guard.classify(
        [_captioned("WORTHLESS IDIOT"), _captioned("HAVE A NICE DAY"), demo_photo("coffee")], [None] * 3, load_policy()
    )
    assert unsafe.label == "unsafe" and "worthless" in unsafe.rationale and unsafe.score > 0.5
    assert json.loads(unsafe.raw)[0]["text"].upper().startswith("WORTHLESS")
    assert safe.label == "safe" and "no lexicon words" in safe.rationale and safe.score == 0.0
    assert plain.label == "safe" and plain.rationale == "no text detected"


def test_ocr_lexicon_options():
    guard = build_backend("guards", "ocr-lexicon:box_thresh=0.3,mode=det")
    assert guard.ocr.box_thresh == 0.3 and guard.ocr.use_det and guard.ocr.text_score == 0.5
    with pytest.raises(ValueError, match="ocr-lexicon option mode must be one of det, rec, got 'both'"):
        build_backend("guards", "ocr-lexicon:mode=both")
    with pytest.raises(ValueError, match="ocr-lexicon option box_thresh must be a number, got 'high'"):
        build_backend("guards", "ocr-lexicon:box_thresh=high")
    with pytest.raises(ValueError, match=r"invalid ocr-lexicon option value\(s\): box_thresh=2.0 \(allowed: \[0, 1\]\)"):
        build_backend("guards", "ocr-lexicon:box_thresh=2")
    with pytest.raises(ValueError, match=r"unclip_ratio=0.0 \(allowed: > 0\)"):
        build_backend("guards", "ocr-lexicon:unclip_ratio=0")
    assert not build_backend("guards", "ocr-lexicon", mode="rec").ocr.use_det


def test_nudenet_calls_clothed_photos_safe():
    guard = build_backend("guards", "nudenet")
    verdicts = guard.classify([demo_photo("astronaut"), demo_photo("chelsea")], [None, None], load_policy())
    assert [v.label for v in verdicts] == ["safe", "safe"]
    assert all(0.0 <= v.score < 0.5 for v in verdicts)
    assert isinstance(json.loads(verdicts[0].raw), list)
    with pytest.raises(ValueError, match=r"nudenet option value\(s\): threshold=2.0 \(allowed: \[0, 1\]\)"):
        build_backend("guards", "nudenet:threshold=2")
    with pytest.raises(ValueError, match="unknown nudenet option.*'thresh'.*allowed: threshold"):
        build_backend("guards", "nudenet:thresh=0.2")
    assert build_backend("guards", "nudenet:threshold=0.2", threshold="0.7").threshold == 0.7  # keywords win
    assert build_backend("guards", "nudenet").threshold == 0.5


@pytest.mark.parametrize("omp, threads", [("1", 1), (None, 0)])  # 0: ONNX Runtime's own default (every core)
def test_the_onnx_guards_keep_to_the_thread_budget_of_omp_num_threads(omp, threads, monkeypatch):
    """ONNX Runtime ignores OMP_NUM_THREADS; one-thread processes (torchrun ranks, test workers) would each spin a
    pool over every core. rapidocr's and NudeNet's sessions take the budget the user set, and their default without."""
    from safetypairs.backends import guards, ocr

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    ocr._engine.cache_clear()
    guards._nudenet_detector.cache_clear()
    try:
        ocr._ocr(_captioned("HELLO"), ocr.OCRConfig())  # rapidocr loads its models on first use (not from the memo)
        engine = ocr._engine()
        sessions = {"det": engine.text_det.session.session, "rec": engine.text_rec.session.session,
                    "nudenet": guards._nudenet_detector().onnx_session}
        assert {name: s.get_session_options().intra_op_num_threads for name, s in sessions.items()} == \
            {"det": threads, "rec": threads, "nudenet": threads}
        verdict, = build_backend("guards", "nudenet").classify([demo_photo("astronaut")], [None], load_policy())
        assert verdict.label == "safe" and verdict.raw.startswith("[")  # the replaced session detects as before
    finally:  # the next tests build the engines for their own environment
        ocr._engine.cache_clear()
        guards._nudenet_detector.cache_clear()


def test_text_is_read_once_per_pixels_and_settings_in_a_process(monkeypatch):
    """The stages of one process read the same originals again (instructor, text editor, judge, every OCR guard):
    rapidocr runs once per pixels and settings; a copy of the image is found, other settings or pixels are read."""
    from safetypairs.backends import ocr
    from safetypairs.utils import LRU

    calls = []
    real = ocr._ocr
    monkeypatch.setattr(ocr, "_ocr", lambda image, config: calls.append(config) or real(image, config))
    monkeypatch.setattr(ocr, "_read", LRU(2))
    image = _captioned("HAVE A NICE DAY")
    first = ocr.read_text(image)
    read = list(first)
    assert len(read) == 1 and "NICE" in read[0].text.upper() and len(calls) == 1
    first.clear()  # the caller's list is its own
    assert ocr.read_text(image.copy()) == read and len(calls) == 1
    ocr.read_text(image, ocr.OCRConfig(box_thresh=0.3))
    ocr.read_text(_captioned("WORTHLESS IDIOT"))
    assert len(calls) == 3
    ocr.read_text(image, ocr.OCRConfig(box_thresh=0.3))  # still among the 2 most recent
    ocr.read_text(image)  # forgotten: the least recently used of 3 entries in an LRU of 2
    assert len(calls) == 4


@pytest.mark.parametrize("omp", ["1", None])
def test_opencv_keeps_to_the_thread_budget_of_omp_num_threads(omp):
    """OpenCV ignores OMP_NUM_THREADS too (its pool spans every core); the modules that use it set the budget the
    user set, and leave OpenCV's own default without one (read from a process that only imports cv2)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | ({"OMP_NUM_THREADS": omp} if omp else {})

    def threads(code):
        return int(subprocess.run([sys.executable, "-c", code + "; print(cv2.getNumThreads())"], env=env, check=True,
                                  capture_output=True, text=True).stdout.split()[-1])

    default = threads("import cv2")
    for module in ("safetypairs.validate.change", "safetypairs.backends.ocr_edit", "safetypairs.validate.calibrate"):
        assert threads(f"import {module}, cv2") == (int(omp) if omp else default), module
