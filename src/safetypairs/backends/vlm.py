"""Shared transformers runtime for chat VLMs: load, prompt with images, generate, score choices."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class VLMConfig:
    """How to load a VLM.

    Attributes:
        model: a hub id or a local folder written by ``save_pretrained``.
        device: torch device string (``"cpu"``, ``"cuda:0"``).
        dtype: one of ``DTYPES``; ``"auto"`` is bfloat16 on CUDA and float32 on the CPU.
        trust_remote_code: run the model repo's own code (off unless asked).
        revision: a hub revision (branch, tag or commit); ``None`` for the default.
    """

    model: str
    device: str = "cpu"
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("VLMConfig.model must be a hub id or a local path")
        if self.dtype not in DTYPES:
            raise ValueError(f"VLMConfig.dtype {self.dtype!r} not allowed; allowed: {', '.join(DTYPES)}")


class VLM:
    """A transformers image-text-to-text model with its processor and chat template."""

    def __init__(self, model, processor, config: VLMConfig) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.tokenizer = getattr(processor, "tokenizer", processor)

    @classmethod
    def load(cls, config: VLMConfig) -> "VLM":
        """Load ``AutoProcessor`` and ``AutoModelForImageTextToText`` (safetensors only).

        Args:
            config: what to load and where.

        Returns:
            The ready (eval mode) VLM.

        Raises:
            OSError: when the model cannot be found (e.g. a hub id while offline).
        """
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        common = {"trust_remote_code": config.trust_remote_code, "revision": config.revision}
        processor = AutoProcessor.from_pretrained(config.model, **common)
        if config.dtype == "auto":
            dtype = torch.bfloat16 if config.device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, config.dtype)
        model = AutoModelForImageTextToText.from_pretrained(
            config.model, dtype=dtype, use_safetensors=True, **common
        )
        model.to(config.device).eval()
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"  # generation appends on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        logger.info("loaded VLM %s (%s) on %s as %s", config.model, type(model).__name__, config.device, dtype)
        return cls(model, processor, config)

    def prompt_text(self, prompt: str, answer_prefix: str = "") -> str:
        """Render one user turn (image + text) with the chat template, ready for the answer.

        Args:
            prompt: the user's text.
            answer_prefix: text that starts the assistant's answer (prefilled).

        Returns:
            The prompt string the processor tokenizes.
        """
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + answer_prefix

    def _inputs(self, images: Sequence[Image.Image], prompts: Sequence[str], answer_prefix: str):
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        texts = [self.prompt_text(p, answer_prefix) for p in prompts]
        # one list per sample: a flat list reads as ONE sample with several images (Gemma 3)
        enc = self.processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)
        dtype = self.model.dtype
        return {k: (v.to(self.model.device, dtype) if v.is_floating_point() else v.to(self.model.device))
                for k, v in enc.items()}

    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        answer_prefix: str = "",
    ) -> list[str]:
        """Greedy-decode one answer per (image, prompt) in one batch.

        Args:
            images: RGB images.
            prompts: user texts, one per image.
            max_new_tokens: answer length limit.
            answer_prefix: prefilled start of the answer (not repeated in the output).

        Returns:
            The decoded answers (special tokens removed).
        """
        return self.generate_with_scores(images, prompts, (), max_new_tokens, answer_prefix)[0]

    def generate_with_scores(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        choices: Sequence[str],
        max_new_tokens: int = 32,
        answer_prefix: str = "",
    ) -> tuple[list[str], np.ndarray | None]:
        """Generate answers and, from the first step's logits, each choice's probability.

        The probabilities are a softmax over the choices' first tokens only (see
        `choice_token_ids`), so one generation gives both the text and a score for ROC curves:
        the first step's logits are those of the prompt's last position, so no second forward
        pass is needed. With ``answer_prefix`` (prefilled, e.g. ``'{"rating": "'`` for a JSON
        answer) the first step is where the choice follows the prefix. They come from the
        model's raw logits (``output_logits``), not from the processed scores: a generation
        config's repetition penalty would otherwise penalise "safe" and "unsafe" for appearing
        in the prompt.

        Args:
            images: RGB images.
            prompts: user texts, one per image.
            choices: candidate answers whose first tokens must differ; empty for no scores.
            max_new_tokens: answer length limit.
            answer_prefix: prefilled start of the answer (not repeated in the output).

        Returns:
            ``(answers, probs)``; ``probs`` has shape ``(n, len(choices))`` (rows sum to 1) or
            is ``None`` when no choices were given.

        Raises:
            ValueError: when two choices start with the same token.
        """
        import torch

        ids = list(choice_token_ids(self.tokenizer, choices, self.prompt_text("", answer_prefix))) if choices else []
        inputs = self._inputs(images, prompts, answer_prefix)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                output_logits=bool(choices), return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        answers = [a.strip() for a in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if not choices:
            return answers, None
        picked = out.logits[0].float()[:, ids]  # the first step: the logits at the prompt's last position
        return answers, picked.softmax(dim=-1).cpu().numpy().astype(np.float64)


def choice_token_ids(tokenizer, choices: Sequence[str], context: str = "") -> tuple[int, ...]:
    """The token that starts each choice when it follows ``context``.

    Tokenizes ``context + choice`` and takes the first token past the shared prefix with
    ``context`` alone, so SentencePiece "▁" and byte-level "Ġ" variants come out right.

    Raises:
        ValueError: when a choice is empty or two choices share their first token.
    """
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = []
    for choice in choices:
        full = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
        k = 0
        while k < min(len(base), len(full)) and base[k] == full[k]:
            k += 1
        if k >= len(full):
            raise ValueError(f"choice {choice!r} adds no token after the prompt")
        ids.append(full[k])
    if len(set(ids)) != len(ids):
        raise ValueError(f"choices {list(choices)} share a first token; pick choices that start differently")
    return tuple(ids)


@functools.lru_cache(maxsize=4)
def load_vlm(config: VLMConfig) -> VLM:
    """Load a VLM once per process and config (later calls reuse it).

    Args:
        config: what to load and where.

    Returns:
        The cached `VLM`.
    """
    return VLM.load(config)
