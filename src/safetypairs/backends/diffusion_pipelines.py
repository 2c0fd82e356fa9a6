"""How the ``diffusers`` editor drives and loads pipelines: families, options, working sizes, safe loading."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from safetypairs.backends.options import Option
from safetypairs.backends.vlm import DTYPES
from safetypairs.utils import Range

logger = logging.getLogger(__name__)

OFFLOADS = ("none", "model", "sequential")


@dataclass(frozen=True)
class PipelineFamily:
    """How to drive one diffusers pipeline class.

    Attributes:
        resolution: default working resolution (the side of a square of the same area).
        packed: latents are packed 2x2 (Flux, Qwen): sizes are multiples of 2 * vae_scale_factor.
        batched: one call may carry several source images (QwenImageEditPlus reads a list of
            images as several references for ONE edit, so it runs image by image).
        cfg_arg: the call argument that takes ``guidance``.
        negative_prompt: passed to enable true classifier-free guidance (Qwen).
        guidance: the model card's guidance when it differs from the pipeline's default
            (``None``: the pipeline's default).
    """

    resolution: int
    packed: bool
    batched: bool = True
    cfg_arg: str = "guidance_scale"
    negative_prompt: str | None = None
    guidance: float | None = None


_QWEN = PipelineFamily(1024, packed=True, batched=False, cfg_arg="true_cfg_scale", negative_prompt=" ")
# FLUX.1 Kontext [dev]'s model card runs guidance_scale=2.5; the pipelines default to 3.5.
_KONTEXT = PipelineFamily(1024, packed=True, guidance=2.5)
# Inpainting pipelines default to a partial strength (FluxInpaint, QwenImageEditInpaint: 0.6) that
# keeps much of the masked content; a replacement repaints the mask from noise.
REPLACE_STRENGTH = 1.0
PIPELINES: dict[str, PipelineFamily] = {
    "StableDiffusionInstructPix2PixPipeline": PipelineFamily(512, packed=False),
    "StableDiffusionXLInstructPix2PixPipeline": PipelineFamily(768, packed=False),
    "FluxKontextPipeline": _KONTEXT,
    "FluxKontextInpaintPipeline": _KONTEXT,
    "QwenImageEditPipeline": _QWEN,
    "QwenImageEditPlusPipeline": _QWEN,
    "QwenImageEditInpaintPipeline": _QWEN,
    "StableDiffusionInpaintPipeline": PipelineFamily(512, packed=False),
    "StableDiffusionXLInpaintPipeline": PipelineFamily(1024, packed=False),
    "FluxFillPipeline": PipelineFamily(1024, packed=True),
    "FluxInpaintPipeline": PipelineFamily(1024, packed=True),
}


@dataclass(frozen=True)
class DiffusionOptions:
    """Settings of the ``diffusers`` editor; `DIFFUSION_OPTIONS` declares each (type, help, default, range).

    ``None`` leaves a setting to the pipeline (or its family: FLUX.1 Kontext's model card guidance 2.5, an
    inpainting strength of ``REPLACE_STRENGTH``, the family's working resolution).
    """

    steps: int | None
    guidance: float | None
    image_guidance: float | None
    resolution: int | None
    dtype: str
    offload: str
    trust_remote_code: bool
    revision: str | None
    safety_checker: bool
    strength: float | None
    allow_pickle: bool


DIFFUSION_OPTIONS = {
    "steps": Option(int, "denoising steps (unset: the pipeline's default)", None, Range(1)),
    "guidance": Option(float, "text guidance scale, true_cfg_scale for Qwen (unset: the model card's, else the "
                              "pipeline's)"),
    "image_guidance": Option(float, "image guidance scale, InstructPix2Pix only (unset: the pipeline's)"),
    "resolution": Option(int, "working resolution, side of the equal-area square (0: the source size; unset: the "
                              "pipeline family's)", None, Range(0)),
    "dtype": Option(DTYPES, "torch dtype (auto: bfloat16 on CUDA, float16 without bf16, float32 on the CPU)", "auto"),
    "offload": Option(OFFLOADS, "diffusers model or sequential CPU offload (CUDA only)", "none"),
    "trust_remote_code": Option(bool, "allow custom pipeline code from the model repo", False),
    "revision": Option(str, "hub revision: branch, tag or commit (unset: the default branch)"),
    "safety_checker": Option(bool, "keep the pipeline's own NSFW checker when it ships one (flagged outputs become "
                                   "error rows)", True),
    "strength": Option(float, "inpainting pipelines only: how far the masked region is re-noised (unset: "
                              f"{REPLACE_STRENGTH})", None, Range(0, 1, open_low=True)),
    "allow_pickle": Option(bool, "load components that ship only pickle weights (.bin/.pt, which can run code when "
                                 "loaded); off: safetensors only", False),
}


def model_index(model: str, revision: str | None = None) -> dict[str, Any]:
    """Read a pipeline's ``model_index.json`` (local folder or hub id); ``_class_name`` names its class.

    Raises:
        OSError: when the folder or repo has no ``model_index.json``.
    """
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(model, revision=revision))


def work_size(size: tuple[int, int], resolution: int, multiple: int) -> tuple[int, int]:
    """The size a pipeline runs at: the source's aspect at ``resolution**2`` pixels (``0``: the
    source size), each side rounded to a multiple of ``multiple`` (at least one multiple)."""
    w, h = size
    if resolution:
        scale = math.sqrt(resolution * resolution / (w * h))
        w, h = w * scale, h * scale
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name != "auto":
        return getattr(torch, name)
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_dtype(pipe: Any, model: str, dtype: Any) -> None:
    """The denoiser (transformer or unet) must hold the requested dtype.

    Raises:
        ValueError: naming the component, both dtypes and the diffusers version.
    """
    import diffusers

    for name in ("transformer", "unet"):
        loaded = getattr(getattr(pipe, name, None), "dtype", None)
        if loaded is not None and loaded != dtype:
            raise ValueError(f"{model!r}: the {name} loaded as {loaded}, not the requested {dtype} (diffusers "
                             f"{diffusers.__version__}; from_pretrained(dtype=...) needs diffusers >= 0.40)")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def components_without_safetensors(model: str, index: dict[str, Any], revision: str | None = None) -> list[str]:
    """The pipeline components whose weights exist only as pickle files (no ``.safetensors``).

    Reads a local folder directly, or a hub repo's file list; when the list cannot be read
    (offline), returns ``[]`` and leaves the check to ``from_pretrained``.
    """
    if os.path.isdir(model):
        files = [os.path.relpath(os.path.join(root, f), model).replace(os.sep, "/")
                 for root, _, names in os.walk(model) for f in names]
    else:
        from huggingface_hub import list_repo_files

        try:
            files = list_repo_files(model, revision=revision)
        except OSError:  # offline or unreachable: from_pretrained reports it
            return []
    missing = []
    for name in (k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and None not in v):
        weights = [f for f in files if f.startswith(f"{name}/") and f.endswith(_WEIGHT_SUFFIXES)]
        if weights and not any(f.endswith(".safetensors") for f in weights):
            missing.append(name)
    return missing


def load_pipeline(model: str, device: str, opts: DiffusionOptions, has_checker: bool) -> Any:
    """``DiffusionPipeline.from_pretrained`` (safetensors unless ``allow_pickle``), then device or offload set-up.

    Raises:
        ValueError: when the denoiser did not load in the requested dtype.
    """
    from diffusers import DiffusionPipeline

    extra: dict[str, Any] = {}
    if has_checker and not opts.safety_checker:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    dtype = torch_dtype(opts.dtype, device)
    pipe = DiffusionPipeline.from_pretrained(  # dtype= needs diffusers >= 0.40 (older releases ignore it)
        model, dtype=dtype, use_safetensors=None if opts.allow_pickle else True,
        trust_remote_code=opts.trust_remote_code, revision=opts.revision, **extra,
    )
    _check_dtype(pipe, model, dtype)
    if opts.offload != "none" and device.startswith("cuda"):
        enable = pipe.enable_model_cpu_offload if opts.offload == "model" else pipe.enable_sequential_cpu_offload
        enable(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) on %s", model, type(pipe).__name__, device)
    return pipe
