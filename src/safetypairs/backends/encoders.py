"""Image encoders for pair validation: spatial LPIPS maps and CLIP image embeddings."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from safetypairs.backends.options import HUB_MODEL, Argument, Option

logger = logging.getLogger(__name__)

LPIPS_NETS = ("alex", "vgg", "squeeze")
# Smallest side each LPIPS backbone accepts (measured: smaller inputs pool down to nothing).
LPIPS_MIN_SIDE = {"alex": 32, "squeeze": 24, "vgg": 16}


class LPIPSEncoder:
    """Spatial LPIPS (``lpips.LPIPS(net=..., spatial=True)``): a per-pixel perceptual distance map.

    Spec: ``lpips:<alex|vgg|squeeze>[,pnet_rand=true]``. The backbone's ImageNet weights come
    from torchvision (downloaded on first use); ``pnet_rand=true`` builds a random backbone and is
    meant for offline tests only, its distances carry no perceptual meaning.
    """

    ARGUMENT = Argument("<net>", default="alex", choices=LPIPS_NETS)
    OPTIONS = {"pnet_rand": Option(bool, "random backbone, for offline tests only (no perceptual meaning)", False)}

    def __init__(self, net: str, device: str, pnet_rand: bool) -> None:
        import lpips
        import torch

        self.net, self.device, self.pnet_rand = net, device, pnet_rand
        self.min_side = LPIPS_MIN_SIDE[net]
        if pnet_rand:
            logger.warning("LPIPS %s with a random backbone (pnet_rand): for tests only", net)
        self.model = lpips.LPIPS(net=net, spatial=True, pnet_rand=pnet_rand, verbose=False)
        self.model.eval().requires_grad_(False).to(device)
        self._torch = torch

    @classmethod
    def from_spec(cls, arg: str, device: str = "cpu", **options: Any) -> LPIPSEncoder:
        """Build the net ``arg`` with the options (`OPTIONS`; the registry checks and casts both)."""
        return cls(arg, device, options["pnet_rand"])

    @property
    def name(self) -> str:
        """The metric name recorded in ``metrics_ran``."""
        return f"lpips:{self.net}" + (",pnet_rand" if self.pnet_rand else "")

    def distance_maps(self, originals: list[np.ndarray], edited: list[np.ndarray]) -> list[np.ndarray]:
        """Per-pixel LPIPS distance between image pairs.

        Args:
            originals: float32 ``HxWx3`` arrays in ``[0, 1]``.
            edited: arrays of the same shapes as ``originals``.

        Returns:
            One float32 ``HxW`` map per pair (same-size pairs run as one batch).

        Raises:
            ValueError: for a pair whose shapes differ or that is smaller than ``min_side``.
        """
        maps: list[np.ndarray | None] = [None] * len(originals)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (a, b) in enumerate(zip(originals, edited)):
            if a.shape != b.shape or min(a.shape[:2]) < self.min_side:
                raise ValueError(f"LPIPS {self.net} needs equal shapes >= {self.min_side}px, got {a.shape}, {b.shape}")
            groups.setdefault(a.shape, []).append(i)
        for idx in groups.values():
            out = self._forward(np.stack([originals[i] for i in idx]), np.stack([edited[i] for i in idx]))
            for i, m in zip(idx, out):
                maps[i] = m
        return maps  # type: ignore[return-value]

    def _forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        torch = self._torch

        def prep(x: np.ndarray) -> Any:
            return torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device) * 2.0 - 1.0

        with torch.inference_mode():
            return self.model(prep(a), prep(b))[:, 0].float().cpu().numpy()


class _NamedModel:
    """``from_spec`` of the CLIP encoders: the spec's argument names the model (checked by the registry); they
    take no options."""

    OPTIONS: dict[str, Option] = {}

    @classmethod
    def from_spec(cls, arg: str, device: str = "cpu") -> Any:
        """Load the model ``arg`` on ``device``."""
        return cls(arg, device=device)


def _l2_normalize(features: Any) -> np.ndarray:
    feats = features.float().cpu().numpy()
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def open_clip_arguments(spec: str) -> tuple[str, str | None, bool]:
    """Resolve an open_clip spec into ``create_model_and_transforms`` arguments.

    ``<arch>/<pretrained>`` names a built-in arch and a pretrained tag, a checkpoint path or
    ``none``; ``hf-hub:<org>/<name>`` and ``local-dir:<folder>`` carry their own config and weights.
    QuickGELU follows the pretrained tag's own config: e.g. ``ViT-B-32/openai`` was trained with
    QuickGELU although the ``ViT-B-32`` config builds GELU.

    Returns:
        ``(model_name, pretrained, force_quick_gelu)``.

    Raises:
        ValueError: when the arch or the schema's identifier is missing.
    """
    import open_clip

    if spec.startswith(OPEN_CLIP_SCHEMAS):
        if not spec.partition(":")[2].strip():
            raise ValueError(f"open_clip spec {spec!r} needs a repo or folder after the schema")
        return spec, None, False
    arch, _, pretrained = spec.partition("/")
    if not arch:
        raise ValueError(f"open_clip needs {_OPEN_CLIP_USAGE} after 'open_clip:', got {spec!r}")
    if pretrained.lower() in ("", "none"):
        return arch, None, False
    tag_quick_gelu = bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))
    model_quick_gelu = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    return arch, pretrained, tag_quick_gelu and not model_quick_gelu


_OPEN_CLIP_USAGE = "<arch>/<pretrained> (e.g. ViT-B-32/openai), hf-hub:<org>/<name> or local-dir:<folder>"


class OpenCLIPEncoder(_NamedModel):
    """CLIP image embeddings from ``open_clip``.

    Spec: ``open_clip:<arch>/<pretrained>`` where ``<pretrained>`` is an open_clip tag (e.g.
    ``openai``), a local checkpoint path, or ``none`` (random weights, for tests); or
    ``open_clip:hf-hub:<org>/<name>`` / ``open_clip:local-dir:<folder>`` (config + weights in the
    repo or folder). QuickGELU follows the tag (see `open_clip_arguments`). Images are squashed
    to the model's input size (no centre crop) so the whole frame is compared.
    """

    ARGUMENT = Argument(_OPEN_CLIP_USAGE)

    def __init__(self, spec: str, device: str = "cpu") -> None:
        import open_clip
        import torch

        model_name, pretrained, quick_gelu = open_clip_arguments(spec)
        self.model_name = model_name  # the arch or schema spec; open_clip.get_tokenizer reads it
        schema = spec.startswith(OPEN_CLIP_SCHEMAS)
        self.name = f"open_clip:{spec}" if schema else f"open_clip:{model_name}/{pretrained or 'none'}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, image_resize_mode="squash",
            force_quick_gelu=quick_gelu,
        )
        self.model.eval().requires_grad_(False)
        self.device = device
        self._torch = torch

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings, shape ``(len(images), dim)``."""
        torch = self._torch
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode():
            return _l2_normalize(self.model.encode_image(batch))


class HFCLIPEncoder(_NamedModel):
    """CLIP image embeddings from ``transformers`` (``CLIPModel`` + ``CLIPImageProcessor``).

    Spec: ``hf-clip:<hub id or local path>``. Loaded with ``from_pretrained`` (safetensors, no
    remote code). Images are squashed to the processor's crop size so nothing is cropped away.
    """

    ARGUMENT = HUB_MODEL

    def __init__(self, model_id: str, device: str = "cpu") -> None:
        import torch
        from transformers import CLIPImageProcessor, CLIPModel

        self.model_id = model_id  # the CLIP tokenizer of the same folder reads the text tower's input
        self.name = f"hf-clip:{model_id}"
        self.model = CLIPModel.from_pretrained(model_id, use_safetensors=True).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(model_id)
        crop = self.processor.crop_size or {}
        side = self.model.config.vision_config.image_size
        self.size = (int(crop.get("width", side)), int(crop.get("height", side)))
        self.device = device
        self._torch = torch

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings, shape ``(len(images), dim)``."""
        torch = self._torch
        squashed = [im.resize(self.size, Image.BICUBIC) for im in images]
        pixels = self.processor(images=squashed, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels)
        return _l2_normalize(out if isinstance(out, torch.Tensor) else out.pooler_output)
