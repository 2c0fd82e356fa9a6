"""Offline text encoder: hashed word n-grams of the text rapidocr reads in an image, L2-normalised."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
from PIL import Image

from safetypairs.backends.ocr import read_text
from safetypairs.backends.options import Option
from safetypairs.utils import Range

NO_TEXT = "<no-text>"  # the token of an image without readable text, so every embedding has unit norm
_WORD = re.compile(r"[a-z0-9]+")


def word_ngrams(text: str, n: int) -> list[str]:
    """Lower-cased word n-grams of ``text`` for every order from 1 to ``n`` (``[NO_TEXT]`` when empty)."""
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i:i + m]) for m in range(1, n + 1) for i in range(len(words) - m + 1)]
    return grams or [NO_TEXT]


def hash_features(tokens: list[str], dim: int) -> np.ndarray:
    """Signed feature hashing (stable across processes: blake2b, not Python's salted ``hash``), L2-normalised.

    When colliding signs cancel every count, the unsigned counts are used, so the norm is never 0.
    """
    digests = [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") for t in tokens]
    buckets = np.array([d % dim for d in digests], dtype=np.int64)
    signs = np.array([1.0 if (d >> 63) & 1 else -1.0 for d in digests], dtype=np.float32)
    vector = np.bincount(buckets, weights=signs, minlength=dim).astype(np.float32)
    if not vector.any():
        vector = np.bincount(buckets, minlength=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


class OCRTextEncoder:
    """``ocr-text[:dim=1024,ngrams=2,max_side=0]``: what rapidocr reads in an image, as hashed word n-grams.

    Runs offline with the PP-OCR models shipped in rapidocr's wheel, so a linear probe can be
    trained end to end on text-overlay data without downloaded weights. The lines read are
    joined top to bottom; an image without text embeds as the unit vector of ``<no-text>``.
    ``max_side`` > 0 shrinks larger images before reading (faster; large captions still read).
    """

    ARGUMENT = None
    OPTIONS = {
        "dim": Option(int, "embedding dimension (hash buckets)", 1024, Range(2)),
        "ngrams": Option(int, "longest word n-gram hashed", 2, Range(1, 4)),
        "max_side": Option(int, "downscale images to this longest side before OCR (0: as given)", 0, Range(0)),
    }

    def __init__(self, dim: int, ngrams: int, max_side: int) -> None:
        self.dim, self.ngrams, self.max_side = dim, ngrams, max_side
        self.name = f"ocr-text:dim={dim},ngrams={ngrams}" + (f",max_side={max_side}" if max_side else "")

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **options: Any) -> OCRTextEncoder:
        """Build from the options (`OPTIONS`, checked and cast by the registry); ``device`` is unused (ONNX on CPU)."""
        return cls(**options)

    def texts(self, images: list[Image.Image]) -> list[str]:
        """The text read in each image (lines joined top to bottom; empty without text)."""
        return [" ".join(line.text for line in read_text(self._sized(image))) for image in images]

    def _sized(self, image: Image.Image) -> Image.Image:
        if not self.max_side or max(image.size) <= self.max_side:
            return image
        small = image.copy()
        small.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
        return small

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised hashed n-gram vectors, shape ``(len(images), dim)``."""
        rows = [hash_features(word_ngrams(text, self.ngrams), self.dim) for text in self.texts(images)]
        return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)
