"""Tests for safetypairs.backends.vlm with a tiny random Llava saved and loaded like a hub id."""

import numpy as np
import pytest
from PIL import Image
from tiny_models import build_tiny_vlm, reference_next_word_probs

from safetypairs.backends.vlm import VLMConfig, choice_token_ids, load_vlm


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))
    return load_vlm(VLMConfig(path))


def _images():
    return [Image.new("RGB", (48, 40), "red"), Image.new("RGB", (64, 64), (10, 200, 30))]


def test_generate_batched_matches_single(vlm):
    prompts = ["Is this safe ?", "Is the image safe or unsafe ? Answer with one word"]
    batch = vlm.generate(_images(), prompts, max_new_tokens=5)
    assert len(batch) == 2 and all(isinstance(a, str) and a for a in batch)
    assert vlm.generate(_images()[1:], prompts[1:], max_new_tokens=5) == batch[1:]  # left padding is right


def _reference_text(vlm, prompt, prefix=""):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix


@pytest.mark.parametrize("words, prefix", [(("safe", "unsafe"), ""), (("Safe", "Unsafe"), '{"rating": "')])
def test_generate_scores_equal_a_separate_forward_pass(vlm, words, prefix):
    """The scores read from generate's first step (batched, left-padded) equal a plain forward pass per image on the
    prompt (with the answer prefix prefilled), done here: no second pass is needed."""
    prompts = ["a", "Is the image unsafe ?"]
    answers, probs = vlm.generate_with_scores(_images(), prompts, words, max_new_tokens=2, answer_prefix=prefix)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1.0) and len(answers) == 2
    expected = [reference_next_word_probs(vlm.model, vlm.processor, image, _reference_text(vlm, p, prefix), words)
                for image, p in zip(_images(), prompts)]
    assert np.allclose(probs, expected, atol=1e-5)


def test_choice_token_ids_reject_shared_first_token(vlm):
    with pytest.raises(ValueError, match="share a first token"):
        choice_token_ids(vlm.tokenizer, ("safe", "safe"))
    assert len(set(choice_token_ids(vlm.tokenizer, ("safe", "unsafe"), "ASSISTANT:"))) == 2


def test_bad_choices_raise_before_the_model_runs(vlm, monkeypatch):
    monkeypatch.setattr(vlm.model, "generate", lambda *a, **k: pytest.fail("generate ran"))
    with pytest.raises(ValueError, match="share a first token"):
        vlm.generate_with_scores(_images(), ["a", "b"], ("safe", "safe"), max_new_tokens=2)


def test_config_validation():
    with pytest.raises(ValueError, match="allowed: auto"):
        VLMConfig("x", dtype="float8")
    with pytest.raises(ValueError):
        VLMConfig("")


def test_scores_come_from_raw_logits_despite_repetition_penalty(tmp_path):
    """Qwen2/2.5-VL generation configs set a repetition penalty: the score must not see it."""
    import torch
    from transformers import GenerationConfig

    path = build_tiny_vlm(tmp_path / "penalised")
    config = GenerationConfig.from_pretrained(path)
    config.repetition_penalty = 5.0
    config.save_pretrained(path)
    vlm = load_vlm(VLMConfig(path))
    assert vlm.model.generation_config.repetition_penalty == 5.0
    images, prompts = _images(), ["Is the image safe or unsafe ?", "unsafe unsafe safe"]
    answers, probs = vlm.generate_with_scores(images, prompts, ("safe", "unsafe"), max_new_tokens=2)
    inputs = vlm._inputs(images, prompts, "")
    ids = list(choice_token_ids(vlm.tokenizer, ("safe", "unsafe"), vlm.prompt_text("")))
    with torch.inference_mode():
        raw = vlm.model(**inputs).logits[:, -1, :]
        penalised = vlm.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True).scores[0]
    assert np.allclose(probs, raw[:, ids].float().softmax(-1).numpy(), atol=1e-5)
    assert not np.allclose(probs, penalised[:, ids].float().softmax(-1).numpy(), atol=1e-3)  # the drift fixed
