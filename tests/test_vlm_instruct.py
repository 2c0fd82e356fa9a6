"""Tests for the ``hf-vlm:<path>`` instructor: prompt, robust JSON parsing, status rows, tiny VLM end to end."""

from __future__ import annotations

import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from tiny_models import build_tiny_gemma3, build_tiny_ip2p, build_tiny_vlm

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.backends.vlm_instruct import (
    UnparsableAnswer,
    build_prompt,
    parse_answer,
)
from safetypairs.generate import generate_pairs
from safetypairs.instruct import InstructConfig, run_instruct
from safetypairs.policy import load_policy
from safetypairs.backends.registry import check_options, load_backend


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory) -> str:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model")


def _source() -> Dataset:
    from skimage import data

    images = [PILImage.fromarray(data.astronaut()).resize((40, 40)), PILImage.fromarray(data.coffee()).resize((36, 28))]
    features = Features({S.SOURCE_ID: Value("string"), S.IMAGE: Image(), S.CATEGORY: Value("string"),
                         S.RATIONALE: Value("string")})
    return Dataset.from_dict({S.SOURCE_ID: ["a", "b"], S.IMAGE: images, S.CATEGORY: ["O6", "O2"],
                              S.RATIONALE: ["a pistol is pointed at the viewer", ""]}, features=features)


@pytest.mark.parametrize("text, expected", [
    ('{"instruction": "Replace the gun with a {banana}", "element": "gun"}',
     {"instruction": "Replace the gun with a {banana}", "element": "gun"}),
    ('Sure!\n```json\n{"instruction": "Replace the knife with a spoon", "element": "knife", "caption": "a kitchen"}\n```',
     {"instruction": "Replace the knife with a spoon", "element": "knife", "caption": "a kitchen"}),
    ("{'instruction': 'Replace the blood with red paint', 'element': 'blood'}",
     {"instruction": "Replace the blood with red paint", "element": "blood"}),
    ('{"instruction": "Replace the \\"slur\\" with \\"hello\\"", "element": "the sl',  # truncated answer
     {"instruction": 'Replace the "slur" with "hello"'}),
    ('{"instruction": "Replace the gun\nwith a banana.", "element": "gun"}',  # raw newline inside a string
     {"instruction": "Replace the gun\nwith a banana.", "element": "gun"}),
    ('{"instruction": "Replace the gun\nwith a banana.", "element": "gu',  # ... and truncated
     {"instruction": "Replace the gun\nwith a banana."}),
    ('{"instruction": "Replace C:\\x\\y with a banana", "element": "gu',  # invalid JSON escape, truncated
     {"instruction": "Replace C:\\x\\y with a banana"}),
])
def test_parse_answer_is_robust(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize("text", ["", "no json here", '{"instruction": ""}', '{"element": "gun"}',
                                  '{"instruction": 5}', "{{{{"])
def test_parse_answer_rejects_unusable(text):
    with pytest.raises(UnparsableAnswer):
        parse_answer(text)


def test_prompt_carries_category_policy_and_rationale():
    policy = load_policy("llavaguard")
    prompt = build_prompt({S.CATEGORY: "O6", S.RATIONALE: "a pistol is pointed at the viewer"}, policy)
    assert "O6: Weapons or Substance Abuse" in prompt and "O1:" not in prompt
    assert "a pistol is pointed at the viewer" in prompt and "REPLACE" in prompt and '"instruction"' in prompt
    assert "Why this image is unsafe" not in build_prompt({S.CATEGORY: "O2", S.RATIONALE: ""}, policy)


def test_random_vlm_output_becomes_status_rows(vlm_path):
    config = InstructConfig(instructor=f"hf-vlm:{vlm_path}", device="cpu",
                            instructor_options=(("max_new_tokens", "12"),))
    out, result = run_instruct(_source(), config)
    assert len(out) == 2 and result.rows_out == 2
    assert out[S.INSTRUCT_STATUS] == ["unparsable", "unparsable"]  # random weights write no JSON
    assert all(raw is not None for raw in out[S.INSTRUCT_RAW]) and out[S.INSTRUCTION] == [None, None]
    assert all("no JSON object" in err for err in out[S.INSTRUCT_ERROR])


def test_hf_vlm_then_diffusers_end_to_end(vlm_path, tmp_path, monkeypatch):
    """The same tiny VLM, with its answers replaced by well-formed JSON for one row, feeds the editor."""
    editor = build_tiny_ip2p(tmp_path / "ip2p")
    instructor = load_backend("instructors", f"hf-vlm:{vlm_path}", "cpu", max_new_tokens="8")
    real_generate = instructor.vlm.generate
    seen = {}

    def generate(images, prompts, max_new_tokens=32, answer_prefix=""):
        seen["prompts"] = prompts
        real_generate(images, prompts, max_new_tokens=max_new_tokens)  # the real model still runs
        return ['{"instruction": "Replace the pistol with a hairdryer", "element": "pistol"}', "I cannot help."]

    monkeypatch.setattr(instructor.vlm, "generate", generate)
    rows = generate_pairs(_source(), "llavaguard", instructor=f"hf-vlm:{vlm_path}", editor=f"diffusers:{editor}",
                          candidates=2, device="cpu", instructor_options=(("max_new_tokens", "8"),),
                          editor_options=(("steps", "1"), ("resolution", "16")))
    assert "a pistol is pointed at the viewer" in seen["prompts"][0]
    assert rows[S.INSTRUCTION] == ["Replace the pistol with a hairdryer"] * 2 + [None, None]
    assert rows[S.ELEMENT][:2] == ["pistol", "pistol"]
    assert rows[S.INSTRUCT_STATUS] == [ST.OK, ST.OK, "unparsable", "unparsable"]
    assert rows[S.EDIT_STATUS] == [ST.OK, ST.OK, "not_instructed", "not_instructed"]
    assert rows[0][S.EDITED_IMAGE].size == (40, 40)


def test_unknown_option_is_an_error(vlm_path):
    with pytest.raises(ValueError, match="unknown hf-vlm option.*max_new_tokens"):
        load_backend("instructors", f"hf-vlm:{vlm_path}", "cpu", temperature="0.7")
    with pytest.raises(ValueError, match="unknown hf-vlm option"):
        load_backend("instructors", f"hf-vlm:{vlm_path},temperature=0.7", "cpu")


@pytest.mark.parametrize("spec, options, message", [
    ("hf-vlm:some/model", {"temperature": "0.7"}, r"unknown hf-vlm option\(s\) \['temperature'\]; allowed: dtype"),
    ("hf-vlm:some/model,dtype=fp8", {}, "hf-vlm option dtype must be one of auto, float32, float16, bfloat16, got 'fp8'"),
    ("hf-vlm:some/model", {"max_new_tokens": "0"}, r"max_new_tokens=0 \(allowed: >= 1\)"),
    ("hf-vlm:some/model,trust_remote_code=perhaps", {}, "hf-vlm option trust_remote_code must be true or false, got .perhaps."),
    ("hf-vlm", {}, "hf-vlm needs <hub id or local path> after 'hf-vlm:'"),
])
def test_instructor_options_are_checked_up_front_without_a_model(spec, options, message):
    """`some/model` does not exist: these fail in the option check, before anything would load."""
    with pytest.raises(ValueError, match=message):
        check_options("instructors", spec, options)
    check_options("instructors", "hf-vlm:some/model,dtype=bfloat16", {"max_new_tokens": "12"})
    with pytest.raises(ValueError, match="temperature"):
        InstructConfig(instructor="hf-vlm:some/model,temperature=0.7")


def test_options_inline_in_the_spec_like_the_guards(vlm_path):
    instructor = load_backend("instructors", f"hf-vlm:{vlm_path},max_new_tokens=12,dtype=float32", "cpu")
    assert instructor.max_new_tokens == 12 and instructor.vlm.config.model == vlm_path
    assert instructor.vlm.config.dtype == "float32"


def test_gemma3_instructor_batches_three_rows(tmp_path):
    """Gemma 3 reads a flat image list as one sample: the instructor must nest one image per row."""
    from skimage import data

    path = build_tiny_gemma3(tmp_path / "gemma3")
    instructor = load_backend("instructors", f"hf-vlm:{path},max_new_tokens=4", "cpu")
    photos = [PILImage.fromarray(getattr(data, n)()).resize((40, 32)) for n in ("astronaut", "chelsea", "coffee")]
    rows = [{S.IMAGE: p, S.CATEGORY: c, S.RATIONALE: ""} for p, c in zip(photos, ("O1", "O2", "O6"))]
    results = instructor.instruct(rows, load_policy("llavaguard"))
    assert [r.status for r in results] == ["unparsable"] * 3  # random weights write no JSON, but every row ran
    assert results[0].raw and results[0].raw != results[2].raw  # the rows' own images and prompts
    assert [r.raw for r in instructor.instruct(rows[:1], load_policy("llavaguard"))] == [results[0].raw]
