"""Tiny seeded random models saved with ``save_pretrained`` so tests load them like hub ids."""

from __future__ import annotations

import re
from pathlib import Path

# A Llava-style chat template: the user turn holds the image placeholder and the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
# Words the guards' prompts and answers use, so they tokenize to real ids (others map to <unk>).
BASE_WORDS = (
    "safe unsafe Safe Unsafe rating category rationale USER ASSISTANT image the a is of and or to "
    "policy answer with one word should not can O1 O2 O3 O4 O5 O6 O7 O8 O9 NA None applying "
    "Hate Humiliation Harassment Violence Harm Cruelty Sexual Content Nudity Criminal Planning "
    "Weapons Substance Abuse Self Animal Disasters Emergencies photo of shows"
).split()
PUNCTUATION = list('{}[]":,.-_!?()\'/<>|*#=+;')


def _tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level fast tokenizer written in code (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(BASE_WORDS + PUNCTUATION + [w for w in extra_words if w]))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _policy_words() -> tuple[str, ...]:
    from safetypairs.policy import load_policy, render_policy

    return tuple(re.findall(r"[A-Za-z0-9]+", render_policy(load_policy("llavaguard"))))


def build_tiny_vlm(path: str | Path, seed: int = 0, image_size: int = 32) -> str:
    """Build and save a tiny random Llava (CLIP vision tower + Llama text model) with its processor.

    The folder loads through ``AutoProcessor.from_pretrained(path)`` and
    ``AutoModelForImageTextToText.from_pretrained(path)``, the same code path a hub id takes.

    Args:
        path: the output folder.
        seed: torch seed for the random weights.
        image_size: the vision tower's input size (patch size 16).

    Returns:
        The folder path as a string.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(_policy_words())
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=16, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = False
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return str(path)
