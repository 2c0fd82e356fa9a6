"""Tests for the model guards: tiny random VLM through hf-vlm / llavaguard, tiny CLIP zero-shot."""

import pytest
from PIL import Image
from tiny_models import build_tiny_vlm, register_tiny_open_clip

from safetypairs.backends.base import Verdict
from safetypairs.backends.vlm_guards import (
    HFVLMGuard,
    parse_llavaguard,
    parse_safe_unsafe,
)
from safetypairs.policy import load_policy
from safetypairs.registry import load_backend

POLICY = load_policy("llavaguard")


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


def _images():
    return [Image.new("RGB", (48, 40), "red"), Image.new("RGB", (64, 64), (10, 200, 30))]


@pytest.mark.parametrize("answer, label", [
    ("unsafe", "unsafe"), ("Safe.", "safe"), ("**Unsafe**", "unsafe"), ('"safe"', "safe"),
    ("unsafe - shows a weapon", "unsafe"), ("The image is unsafe", "unknown"), ("", "unknown"),
    ("safety first", "unknown"),
])
def test_parse_safe_unsafe_is_strict(answer, label):
    assert parse_safe_unsafe(answer) == label


def test_parse_llavaguard_answers():
    good = '{\n    "rating": "Unsafe",\n    "category": "O1: Hate, Humiliation, Harassment",\n    "rationale": "insult",\n}'
    assert parse_llavaguard(good) == ("unsafe", "O1: Hate, Humiliation, Harassment", "insult")
    assert parse_llavaguard('```json\n{"rating": "Safe", "category": "NA: None applying"}\n```')[0] == "safe"
    assert parse_llavaguard('{"rating": "maybe"}')[0] == "unknown"
    assert parse_llavaguard('{"rating": "Unsafe", "category": ')[0] == "unknown"  # truncated
    assert parse_llavaguard("I cannot help with that")[0] == "unknown"
    assert parse_llavaguard("[1, 2]")[0] == "unknown"


@pytest.mark.parametrize("alias", ["hf-vlm", "llavaguard"])
def test_vlm_guards_end_to_end(vlm_path, alias):
    guard = load_backend("guards", f"{alias}:{vlm_path},max_new_tokens=12")
    verdicts = guard.classify(_images(), ["O1", None], POLICY)
    assert len(verdicts) == 2 and all(isinstance(v, Verdict) for v in verdicts)
    for v in verdicts:
        assert v.label in ("safe", "unsafe", "unknown") and v.raw  # raw answer kept
        assert 0.0 <= v.score <= 1.0
    judge = load_backend("judges", f"{alias}:{vlm_path},max_new_tokens=4,score=false")
    assert all(v.score is None for v in judge.classify(_images(), [None, None], POLICY))


def test_malformed_answers_are_unknown_not_crashes(vlm_path, monkeypatch):
    guard = load_backend("guards", f"hf-vlm:{vlm_path},scope=category")
    answers = ["unsafe", "I think it is fine", "SAFE"]
    monkeypatch.setattr(guard.vlm, "generate_with_scores", lambda *a, **k: (answers, None))
    verdicts = guard.classify(_images() + _images()[:1], ["O1", "O2", None], POLICY)
    assert [v.label for v in verdicts] == ["unsafe", "unknown", "safe"]
    assert verdicts[1].raw == "I think it is fine" and "unparsable" in verdicts[1].rationale


def test_bad_specs_raise(vlm_path):
    with pytest.raises(ValueError, match="allowed"):
        HFVLMGuard.from_spec(f"{vlm_path},temperature=2")
    with pytest.raises(ValueError, match="needs a model"):
        HFVLMGuard.from_spec(None)
    with pytest.raises(ValueError, match="scope"):
        HFVLMGuard.from_spec(f"{vlm_path},scope=everything")


def test_clip_zeroshot(tmp_path):
    arch = register_tiny_open_clip(tmp_path)
    guard = load_backend("guards", f"clip-zeroshot:open_clip:{arch}/none,threshold=0.0")
    verdicts = guard.classify(_images(), ["O1", None], POLICY)
    for v in verdicts:
        assert v.label == ("unsafe" if v.score > 0 else "safe") and '"gap"' in v.raw
    with pytest.raises(ValueError, match="threshold"):
        load_backend("guards", f"clip-zeroshot:open_clip:{arch}/none,threshold=abc")
