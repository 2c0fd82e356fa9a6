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


def _word_level(specials: list[str], extra_words: tuple[str, ...] = (), **special_tokens):
    """A word-level fast tokenizer written in code (no download): ``specials`` first, then the words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(BASE_WORDS + PUNCTUATION + [w for w in extra_words if w]))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", padding_side="left", **special_tokens)


def _tokenizer(extra_words: tuple[str, ...] = ()):
    """The Llava-style word-level tokenizer with its chat template."""
    tokenizer = _word_level(SPECIAL_TOKENS, extra_words, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            extra_special_tokens={"image_token": "<image>"})
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


def build_tiny_answering_vlm(path: str | Path, seed: int = 0, words: tuple[str, str] = ("safe", "unsafe"),
                             image_size: int = 32) -> str:
    """`build_tiny_vlm` whose every answer word is one of ``words``: the output layer reads a single hidden dimension
    that favours the first word when positive and the second when negative (which one depends on the image and the
    prompt, through the random weights), so a guard on it answers in its label vocabulary, as a trained one would.

    Returns:
        The folder path as a string.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(build_tiny_vlm(path, seed, image_size))
    model = LlavaForConditionalGeneration.from_pretrained(path)
    ids = [AutoProcessor.from_pretrained(path).tokenizer.convert_tokens_to_ids(w) for w in words]
    with torch.no_grad():
        norm = model.model.language_model.norm.weight
        norm.zero_()
        norm[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids[0], 0], model.lm_head.weight[ids[1], 0] = 50.0, -50.0
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def build_tiny_fixed_logits_vlm(path: str | Path, logits: dict[str, float], seed: int = 0, image_size: int = 32) -> str:
    """`build_tiny_vlm` whose next-token logits are the same at every text position, whatever the image and prompt:
    ``logits[word]`` for each word given, 0 for every other token.

    Every token embeds as the all-ones vector, the decoder layers add nothing to the residual stream (their output
    projections are zero), the final RMS norm maps the ones to ones (its weight undoes the epsilon) and each
    ``lm_head`` row reads ``logits[word] / hidden_size`` from every dimension. A test knows the logits it set, so it
    can compute the probabilities a guard should report with a softmax of its own.

    Returns:
        The folder path as a string.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(build_tiny_vlm(path, seed, image_size))
    model = LlavaForConditionalGeneration.from_pretrained(path)
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    text = model.model.language_model
    hidden = text.config.hidden_size
    with torch.no_grad():
        text.embed_tokens.weight.fill_(1.0)
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.norm.weight.fill_((1.0 + text.config.rms_norm_eps) ** 0.5)
        model.lm_head.weight.zero_()
        for word, value in logits.items():
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(word)] = value / hidden
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


# --- tiny diffusers editing pipelines ---------------------------------------------------------


def _byte_vocab(suffixes: tuple[str, ...] = ("",)) -> dict[str, int]:
    """A byte-level BPE vocabulary without merges: every byte symbol (with each suffix)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    return {c + s: i for i, (s, c) in enumerate((s, c) for s in suffixes for c in chars)}


def _clip_tokenizer():
    """A CLIP tokenizer written in code: byte symbols, no merges."""
    from transformers import CLIPTokenizer

    vocab = _byte_vocab(("", "</w>"))
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text():
    """A CLIP tokenizer (byte symbols, no merges) and a tiny random CLIP text encoder."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=len(tokenizer), hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
    ))
    return tokenizer, encoder


def _build_tiny_sd(path: str | Path, pipeline: str, unet_in_channels: int, seed: int) -> str:
    """A tiny random Stable-Diffusion-family pipeline (UNet + VAE + CLIP text) saved to ``path``."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    tokenizer, text_encoder = _clip_text()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=32, in_channels=unet_in_channels,
        out_channels=4, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    pipe = getattr(diffusers, pipeline)(
        unet=unet, scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


def build_tiny_ip2p(path: str | Path, seed: int = 0) -> str:
    """Build and save a tiny random `StableDiffusionInstructPix2PixPipeline` (loads with from_pretrained).

    Returns:
        The folder path as a string.
    """
    return _build_tiny_sd(path, "StableDiffusionInstructPix2PixPipeline", 8, seed)  # latents + image latents


def build_tiny_sd_inpaint(path: str | Path, seed: int = 0) -> str:
    """Build and save a tiny random `StableDiffusionInpaintPipeline` (mask-guided editing).

    Returns:
        The folder path as a string.
    """
    return _build_tiny_sd(path, "StableDiffusionInpaintPipeline", 9, seed)  # latents + mask + masked image


def build_tiny_flux_kontext(path: str | Path, seed: int = 0) -> str:
    """Build and save a tiny random `FluxKontextPipeline` (CLIP + T5 tokenizers written in code).

    Returns:
        The folder path as a string.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer, text_encoder = _clip_text()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    t5_tokenizer = T5Tokenizer(vocab=pieces + [(chr(c), -1.0) for c in range(33, 127)], extra_ids=0,
                               model_max_length=512)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, text_encoder_2=t5,
        tokenizer=tokenizer, tokenizer_2=t5_tokenizer, transformer=transformer, vae=vae,
        image_encoder=None, feature_extractor=None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


def build_tiny_qwen_edit(path: str | Path, seed: int = 0, plus: bool = False) -> str:
    """Build and save a tiny random `QwenImageEditPipeline` (or ``Plus``) with a Qwen2.5-VL text encoder.

    Slow on the CPU (~30 s per edit): the pipeline conditions on a ~1 megapixel image.

    Returns:
        The folder path as a string.
    """
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab = _byte_vocab()
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {token: vocab[token] for token in specials}
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": 1e6, "vocab_size": len(vocab),
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}}
    config = Qwen2_5_VLConfig(
        text_config=text, vocab_size=len(vocab), hidden_size=16,
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    )
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
               text_encoder=text_encoder, tokenizer=tokenizer, processor=processor)
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


TINY_CLIP_ARCH = "safetypairs-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_open_clip(folder: str | Path) -> str:
    """Register a tiny open_clip model config, for specs ``open_clip:<arch>/none`` (random weights drawn at each
    load from the torch RNG: only for tests of that spec form; `build_tiny_open_clip` has seeded weights).

    Args:
        folder: where to write the config JSON.

    Returns:
        The arch name.
    """
    import json

    import open_clip

    path = Path(folder) / f"{TINY_CLIP_ARCH}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_CLIP_ARCH


def build_tiny_open_clip(folder: str | Path, seed: int = 0) -> str:
    """Save a tiny open_clip model with seeded random weights as an open_clip folder (config + safetensors).

    Every load reads the same saved weights, whatever the torch RNG state (no test depends on the ones before
    it), through open_clip's own ``local-dir:`` path, the one a downloaded hub folder takes.

    Args:
        folder: the output folder.
        seed: torch seed for the random weights (drawn in a forked RNG: the caller's torch RNG is left alone).

    Returns:
        ``local-dir:<folder>``, for specs such as ``open_clip:local-dir:<folder>``.
    """
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    register_tiny_open_clip(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
    folder = Path(folder)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return f"local-dir:{folder}"


def build_tiny_hf_clip(path: str | Path, seed: int = 0) -> str:
    """Save a tiny random `CLIPModel`, its `CLIPImageProcessor` and a CLIP tokenizer; returns the folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = _clip_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": len(tokenizer), "max_position_embeddings": 77, **ids},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(path, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# ShieldGemma 2's chat template (transformers' convert_shieldgemma2_weights_orbax_to_hf.py _CHAT_TEMPLATE).
SHIELDGEMMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{{ '<start_of_turn>user\\n' }}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ 'You are a policy expert trying to help determine whether a generated or real image is in' }}"
    "{{ ' violation of the safety policy below. Your decision must very clearly follow the specific' }}"
    "{{ ' language used in the safety policy and should not include any interpretation outside of the' }}"
    "{{ ' safety policy.\\n\\n' }}{{ '<BEGIN_SAFETY_POLICY>\\n' }}{{ item['text'] + '\\n' }}"
    "{{ '</END_SAFETY_POLICY>\\n\\n' }}"
    "{{ 'Does the image violate the above policy? Your Answer must start with \\'Yes\\' or \\'No\\'.' }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- else -%}{{ raise_exception('ShieldGemma 2 messages need a list of image and text parts') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# A Gemma 3 style chat template (turn markers, the image as <start_of_image>).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA3_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_soft_token>"}


def _gemma3_parts(extra_words: tuple[str, ...]):
    """A Gemma-3-style word-level tokenizer, tiny Gemma 3 text and SigLIP vision configs, image token ids."""
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    image = GEMMA3_IMAGE_TOKENS
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *image.values()]
    tokenizer = _word_level(specials, extra_words, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            extra_special_tokens=image)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in image.items()}
    return tokenizer, text, vision, ids


def build_tiny_gemma3(path: str | Path, seed: int = 0) -> str:
    """Build and save a tiny random Gemma 3 chat VLM (SigLIP vision + Gemma 3 text) with its processor.

    Gemma 3's processor reads a flat image list as ONE sample with several images, so batches
    of several rows only work with one nested list per row.

    Returns:
        The folder path as a string (loads through ``AutoProcessor`` and
        ``AutoModelForImageTextToText.from_pretrained(path)``).
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tokenizer, text, vision, ids = _gemma3_parts(_policy_words())
    tokenizer.chat_template = GEMMA3_TEMPLATE
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
                                tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          image_token_index=ids["image_token"])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=1.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return str(path)


def build_tiny_shieldgemma2(path: str | Path, seed: int = 0) -> str:
    """Build and save a tiny random ShieldGemma 2 (SigLIP vision + Gemma 3 text) with its processor.

    The Yes/No answer tokens are words of the tiny vocabulary (``yes_token_index`` /
    ``no_token_index`` in the config); the image projection, which Gemma 3 initialises to zero,
    gets random weights so that the image changes the answer.

    Returns:
        The folder path as a string (loads through ``AutoProcessor`` and
        ``ShieldGemma2ForImageClassification.from_pretrained(path)``).
    """
    import torch
    from transformers import (
        Gemma3ImageProcessor,
        ShieldGemma2Config,
        ShieldGemma2ForImageClassification,
        ShieldGemma2Processor,
    )

    tokenizer, text, vision, ids = _gemma3_parts(("Yes", "No", *_policy_words()))
    processor = ShieldGemma2Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
        chat_template=SHIELDGEMMA2_TEMPLATE, image_seq_length=4, policy_definitions={},
    )
    config = ShieldGemma2Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"],
        yes_token_index=tokenizer.convert_tokens_to_ids("Yes"), no_token_index=tokenizer.convert_tokens_to_ids("No"),
    )
    torch.manual_seed(seed)
    model = ShieldGemma2ForImageClassification(config).eval()
    torch.nn.init.normal_(model.model.model.multi_modal_projector.mm_input_projection_weight, std=1.0)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return str(path)


# LLaVA-OneVision's chat template in Qwen 2 turns (LlavaGuard v1.2 OV is a LLaVA-OneVision Qwen 2 model).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_llava_onevision(path: str | Path, seed: int = 0) -> str:
    """Build and save a tiny random LLaVA-OneVision (SigLIP vision + Qwen 2 text, any-resolution image tiles), the
    architecture of LlavaGuard v1.2's transformers checkpoints, with its processor and a Qwen 2 style chat template.

    Images are tiled on a 32 px grid (32x32 up to 64x64 pinpoints), 16 tokens per tile.

    Returns:
        The folder path as a string (loads through ``AutoProcessor`` and
        ``AutoModelForImageTextToText.from_pretrained(path)``).
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<image>", "<video>"]
    tokenizer = _word_level(specials, _policy_words(), eos_token="<|im_end|>", pad_token="<pad>",
                            extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
        num_image_tokens=16, vision_feature_select_strategy="full", chat_template=QWEN2_CHAT_TEMPLATE,
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8, vision_use_head=False)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return str(path)


def reference_next_word_probs(model, processor, image, text: str, words: tuple[str, ...]):
    """A plain reference for scoring tests and benchmarks: one full forward pass of the model on one image and the
    exact prompt ``text``, and the softmax over the next-token logits of ``words`` (whole tokens of the word-level
    tiny tokenizers), as a numpy array.
    """
    import torch

    inputs = processor(images=[[image]], text=[text], return_tensors="pt")
    ids = [processor.tokenizer.convert_tokens_to_ids(w) for w in words]
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1, ids]
    return logits.float().softmax(-1).numpy()
