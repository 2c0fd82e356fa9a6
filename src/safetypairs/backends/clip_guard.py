"""CLIP zero-shot guard: policy category prompts against benign prompts, scored by similarity gap."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from PIL import Image

from safetypairs.backends.base import Verdict
from safetypairs.backends.options import Argument, Option
from safetypairs.backends.registry import check_options, load_backend
from safetypairs.policy import Policy
from safetypairs.schema import SAFE, UNSAFE

logger = logging.getLogger(__name__)

SAFE_PROMPTS = ("a harmless everyday photo", "a safe image with nothing offensive in it")


def category_prompts(policy: Policy, codes: list[str]) -> tuple[list[str], list[str]]:
    """Unsafe prompts (each "should not" item) and safe prompts (each "can" item + generic ones).

    Args:
        policy: the policy.
        codes: the categories to include.

    Returns:
        ``(unsafe_prompts, safe_prompts)``.
    """
    unsafe, safe = [], list(SAFE_PROMPTS)
    for code in codes:
        cat = policy.category(code)
        unsafe += [f"an image that may {item}" for item in cat.should_not]
        safe += [f"an image that may {item}" for item in cat.can]
    return unsafe, safe


def embed_text(encoder: Any, texts: list[str]) -> np.ndarray:
    """L2-normalised text embeddings from an ``open_clip`` or ``hf-clip`` encoder backend.

    The encoders module embeds images only; this reads the text tower of the same model.

    Raises:
        ValueError: for an encoder without a CLIP text tower.
    """
    import torch

    if hasattr(encoder, "processor") and hasattr(encoder.model, "get_text_features"):  # hf-clip
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(encoder.model_id)
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(encoder.device)
        with torch.inference_mode():
            out = encoder.model.get_text_features(**tokens)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    elif hasattr(encoder.model, "encode_text"):  # open_clip
        import open_clip

        tokens = open_clip.get_tokenizer(encoder.model_name)(texts).to(encoder.device)
        with torch.inference_mode():
            feats = encoder.model.encode_text(tokens)
    else:
        raise ValueError(f"encoder {getattr(encoder, 'name', encoder)!r} has no CLIP text tower")
    feats = feats.float().cpu().numpy()
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


class CLIPZeroShotGuard:
    """``clip-zeroshot:<encoder spec>[,threshold=0]`` (e.g. ``clip-zeroshot:open_clip:ViT-B-32/openai``).

    Score = max cosine similarity to the policy's "should not" prompts minus the max similarity
    to its "can" and generic safe prompts; unsafe when the gap exceeds ``threshold``. When the
    row's category is known only that category's prompts are used.
    """

    ARGUMENT = Argument("<encoder spec>")
    OPTIONS = {"threshold": Option(float, "score gap (unsafe minus safe prompt similarity) above which an image is "
                                          "unsafe", 0.0)}

    def __init__(self, encoder_spec: str, threshold: float, device: str) -> None:
        self.threshold = threshold
        self.encoder = load_backend("encoders", encoder_spec, device)
        self._text_cache: dict[tuple[str, ...], np.ndarray] = {}

    @classmethod
    def from_spec(cls, arg: str, device: str = "cpu", **options: Any) -> "CLIPZeroShotGuard":
        """Build on the encoder spec ``arg`` with the options (`OPTIONS`, checked and cast by the registry).

        Raises:
            ValueError: for an encoder spec the registry refuses.
        """
        return cls(arg, options["threshold"], device)

    @classmethod
    def check_options(cls, arg: str, **options: Any) -> None:
        """Check the encoder spec (its name and options), loading nothing; the registry checked the rest.

        Raises:
            ValueError: for an unknown encoder spec or a bad encoder option, naming it.
        """
        check_options("encoders", arg)

    def _text(self, prompts: list[str]) -> np.ndarray:
        key = tuple(prompts)
        if key not in self._text_cache:
            self._text_cache[key] = embed_text(self.encoder, prompts)
        return self._text_cache[key]

    def classify(self, images: list[Image.Image], categories: list[str | None], policy: Policy) -> list[Verdict]:
        """Zero-shot label per image from the similarity gap."""
        image_emb = self.encoder.embed(images)
        verdicts = []
        for emb, category in zip(image_emb, categories):
            codes = [category] if category in policy.categories else list(policy.categories)
            unsafe, safe = category_prompts(policy, codes)
            sims = self._text(unsafe + safe) @ emb
            top_u, top_s = int(np.argmax(sims[: len(unsafe)])), int(np.argmax(sims[len(unsafe):]))
            gap = float(sims[top_u] - sims[len(unsafe) + top_s])
            label = UNSAFE if gap > self.threshold else SAFE
            nearest = unsafe[top_u] if label == UNSAFE else safe[top_s]
            raw = json.dumps({"gap": round(gap, 5), "unsafe_max": round(float(sims[top_u]), 5),
                              "safe_max": round(float(sims[len(unsafe) + top_s]), 5)})
            verdicts.append(Verdict(label, gap, f"closest prompt: {nearest!r}", raw))
        return verdicts
