"""Linear probes on image embeddings: the saved form (safetensors + JSON) and the ``linear-probe`` guard."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from safetypairs.backends.base import Verdict
from safetypairs.backends.options import Argument, Option
from safetypairs.backends.registry import load_backend
from safetypairs.policy import Policy
from safetypairs.schema import SAFE, UNSAFE
from safetypairs.utils import Range

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "probe.safetensors"
CONFIG_FILE = "probe.json"
FORMAT = "safetypairs-linear-probe/1"


@dataclass(frozen=True)
class LinearProbe:
    """A logistic-regression probe: ``P(unsafe | x) = sigmoid(coef . x + intercept)``.

    Attributes:
        coef: float32 weights, one per embedding dimension.
        intercept: the bias.
        encoder: the encoder spec whose embeddings the probe reads (``open_clip:...``, ``ocr-text``).
        meta: training facts kept in the JSON config (C, class counts, validation score, ...).
        threshold: the P(unsafe) at or above which an image is unsafe (chosen on the validation split).
    """

    coef: np.ndarray
    intercept: float
    encoder: str
    meta: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """P(unsafe) for each row of ``embeddings`` (shape ``(n, dim)``).

        Raises:
            ValueError: when the embedding size differs from the probe's.
        """
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.coef.shape[0]:
            raise ValueError(f"probe on {self.encoder!r} expects embeddings of size {self.coef.shape[0]}, "
                             f"got shape {x.shape}")
        logits = x @ self.coef.astype(np.float64) + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))


def save_probe(probe: LinearProbe, path: str | Path) -> Path:
    """Write ``probe.safetensors`` (coef, intercept) and ``probe.json`` (encoder, format, meta) into a folder.

    Returns:
        The folder.
    """
    from safetensors.numpy import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"coef": probe.coef.astype(np.float32), "intercept": np.array([probe.intercept], dtype=np.float32)},
              str(folder / WEIGHTS_FILE))
    config = {"format": FORMAT, "encoder": probe.encoder, "dim": int(probe.coef.shape[0]),
              "classes": [SAFE, UNSAFE], "threshold": probe.threshold, "meta": probe.meta}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    return folder


def load_probe(path: str | Path) -> LinearProbe:
    """Read a folder written by `save_probe` (safetensors only: no pickle).

    Raises:
        FileNotFoundError: when the folder lacks ``probe.json`` or ``probe.safetensors``.
        ValueError: for another format or mismatched sizes.
    """
    from safetensors.numpy import load_file

    folder = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a linear probe folder: {name} is missing")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{str(folder / CONFIG_FILE)!r} has format {config.get('format')!r}; expected {FORMAT!r}")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    coef = tensors["coef"].astype(np.float32)
    if coef.shape != (config["dim"],):
        raise ValueError(f"{str(folder)!r}: coef has shape {coef.shape}, config says dim {config['dim']}")
    return LinearProbe(coef, float(tensors["intercept"][0]), config["encoder"], config.get("meta", {}),
                       float(config.get("threshold", 0.5)))


class LinearProbeGuard:
    """``linear-probe:<probe folder>[,threshold=<0..1>]``: embeds each image with the probe's encoder and
    applies the probe; score = P(unsafe), unsafe when the score reaches ``threshold`` (default: the
    probe's own, chosen on its validation split)."""

    ARGUMENT = Argument("<probe folder>")
    OPTIONS = {"threshold": Option(float, "P(unsafe) at or above which an image is called unsafe (unset: the "
                                          "threshold the probe chose on its validation split)", None, Range(0, 1))}

    def __init__(self, probe: LinearProbe, threshold: float, device: str) -> None:
        self.probe, self.threshold = probe, threshold
        self.encoder = load_backend("encoders", probe.encoder, device)

    @classmethod
    def from_spec(cls, arg: str, device: str = "cpu", **options: Any) -> LinearProbeGuard:
        """Build from the probe folder ``arg`` with the options (`OPTIONS`, checked and cast by the registry).

        Raises:
            FileNotFoundError: when the folder holds no probe.
        """
        probe = load_probe(arg)
        return cls(probe, probe.threshold if options["threshold"] is None else options["threshold"], device)

    def classify(self, images: list[Image.Image], categories: list[str | None], policy: Policy) -> list[Verdict]:
        """P(unsafe) from the probe on each image's embedding (the policy and categories are not used)."""
        scores = self.probe.predict_proba(self.encoder.embed(images))
        return [
            Verdict(UNSAFE if p >= self.threshold else SAFE, float(p),
                    f"linear probe on {self.probe.encoder}: P(unsafe) = {p:.3f}",
                    json.dumps({"p_unsafe": round(float(p), 6)}))
            for p in scores
        ]
