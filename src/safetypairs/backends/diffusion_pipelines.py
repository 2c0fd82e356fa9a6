"""How the ``diffusers`` editor drives and loads pipelines: families, options, working sizes, safe loading."""

from __future__ import annotations

import contextlib
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
# Step caches of diffusers (`enable_cache` on the denoiser) that need no per-model calibration: the option's name ->
# the config class (each is offered where the installed diffusers has it; MagCache needs per-model ratios, FasterCache
# and Pyramid Attention Broadcast target video models, so they are left out).
CACHES = {"first_block": "FirstBlockCacheConfig", "taylorseer": "TaylorSeerCacheConfig", "sea": "SeaCacheConfig"}
# Quantisation of the denoiser: name -> (the package it needs, what it does). ``fp8-storage`` is diffusers' own
# layerwise casting (weights stored in float8, computed in the run's dtype: memory, not speed).
QUANTIZERS = {
    "fp8-storage": (None, "weights stored in float8_e4m3fn, upcast per layer (diffusers layerwise casting)"),
    "torchao-fp8": ("torchao", "float8 weights and dynamic float8 activations (torchao; Hopper-class GPUs)"),
    "torchao-int8": ("torchao", "int8 weight-only (torchao)"),
    "bnb-nf4": ("bitsandbytes", "4-bit NF4 weights (bitsandbytes)"),
    "bnb-int8": ("bitsandbytes", "8-bit weights (bitsandbytes LLM.int8)"),
}
VAE_MODES = ("auto", "on", "off")
# ``auto`` VAE settings, by the working size of a pipeline call: decode the images of a call one at a time
# (slicing) from a quarter megapixel, where a batch's decode activations reach gigabytes and decoding singly costs
# little time; decode in overlapping tiles (tiling, which blends tile seams and so changes pixels slightly) only above
# 4 megapixels, beyond the 1-megapixel working size of every supported family, so default runs are not tiled.
SLICE_SIDE, TILE_SIDE = 512, 2048
SLICE_PIXELS, TILE_PIXELS = SLICE_SIDE * SLICE_SIDE, TILE_SIDE * TILE_SIDE


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
    max_batch: int
    vae_slicing: str
    vae_tiling: str
    compile: bool
    attention_backend: str | None
    cache: str | None
    cache_threshold: float | None
    quantize: str | None


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
    "max_batch": Option(int, "images per pipeline call at most (a larger group of same-size images runs in several "
                             "calls)", 4, Range(1)),
    "vae_slicing": Option(VAE_MODES, "decode a call's images one at a time (auto: when a call decodes several images "
                                     f"of at least {SLICE_SIDE}x{SLICE_SIDE} working pixels)", "auto"),
    "vae_tiling": Option(VAE_MODES, "decode in overlapping tiles, which changes pixels slightly (auto: above "
                                    f"{TILE_SIDE}x{TILE_SIDE} working pixels)", "auto"),
    "compile": Option(bool, "torch.compile the denoiser's repeated blocks (compile_repeated_blocks; the whole "
                            "denoiser when it declares none); the first calls at each size compile", False),
    "attention_backend": Option(str, "diffusers attention backend of the denoiser (set_attention_backend: native, "
                                     "flash, sage, _native_cudnn...; unset: the default, torch SDPA)"),
    "cache": Option(tuple(CACHES), "step cache of the denoiser (diffusers enable_cache): reuses block outputs across "
                                   "steps, changing outputs; the run is named by it (unset: none)"),
    "cache_threshold": Option(float, "the step cache's threshold, for caches that take one (unset: diffusers' "
                                     "default)", None, Range(0, open_low=True)),
    "quantize": Option(tuple(QUANTIZERS), "quantise the denoiser, changing outputs; the run is named by it: "
                                          + "; ".join(f"{k}: {v[1]}" for k, v in QUANTIZERS.items())
                                          + " (unset: none)"),
}


def check_speed_options(opts: DiffusionOptions) -> None:
    """Refuse, before any model loads, speed options the installed packages cannot honour (diffusers is imported
    only to check a cache or an attention backend that is asked for).

    Raises:
        ValueError: naming the option, the value and what is missing (a diffusers cache or attention backend this
            version lacks, a quantiser's package that is not installed, a cache threshold without a cache).
    """
    import importlib.util

    if opts.cache is not None and opts.cache not in available_caches():  # diffusers imported only here
        import diffusers

        raise ValueError(f"cache={opts.cache} needs diffusers' {CACHES[opts.cache]}, which diffusers "
                         f"{diffusers.__version__} lacks; caches here: {', '.join(available_caches()) or 'none'}")
    if opts.cache_threshold is not None and opts.cache is None:
        raise ValueError("cache_threshold needs a cache (cache=first_block, ...)")
    if opts.quantize is not None:
        package = QUANTIZERS[opts.quantize][0]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"quantize={opts.quantize} needs {package}, which is not installed "
                             f"(pip install {package})")
        if opts.offload == "sequential":
            raise ValueError(f"quantize={opts.quantize} cannot be combined with offload=sequential")
    if opts.attention_backend is not None:
        import diffusers
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        names = [b.value for b in AttentionBackendName]
        if opts.attention_backend.lower() not in names:
            raise ValueError(f"attention_backend={opts.attention_backend!r} is not a diffusers "
                             f"{diffusers.__version__} backend; allowed: {', '.join(names)}")
        try:  # a backend whose package (flash-attn, sageattention, kernels...) is missing
            _check_attention_backend_requirements(AttentionBackendName(opts.attention_backend.lower()))
        except RuntimeError as err:
            raise ValueError(f"attention_backend={opts.attention_backend}: {err}") from err


def available_caches() -> list[str]:
    """The `CACHES` names the installed diffusers offers."""
    import diffusers

    return [name for name, cls in CACHES.items() if hasattr(diffusers, cls)]


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


def _check_dtype(pipe: Any, model: str, dtype: Any, quantized: bool = False) -> None:
    """The denoiser (transformer or unet) must hold the requested dtype (a quantised one holds its own).

    Raises:
        ValueError: naming the component, both dtypes and the diffusers version.
    """
    import diffusers

    for name in ("transformer", "unet"):
        loaded = getattr(getattr(pipe, name, None), "dtype", None)
        if loaded is not None and loaded != dtype and not quantized:
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
    """``DiffusionPipeline.from_pretrained`` (safetensors unless ``allow_pickle``) straight onto ``device``
    (``device_map``, ``low_cpu_mem_usage``: no full copy in host memory first) or set up for offload, then the speed
    options (`apply_speed_options`).

    Raises:
        ValueError: when the denoiser did not load in the requested dtype.
    """
    import torch
    from diffusers import DiffusionPipeline

    extra: dict[str, Any] = {}
    if has_checker and not opts.safety_checker:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    dtype = torch_dtype(opts.dtype, device)
    quantization = _quantization_config(opts, dtype)
    if quantization is not None:
        extra["quantization_config"] = quantization
    offload = opts.offload != "none" and device.startswith("cuda")
    target = torch.device(device)
    if not offload:  # diffusers takes a device type ("cuda"): the rank's index is the current device while loading
        extra.update(device_map=target.type, low_cpu_mem_usage=True)
    with torch.cuda.device(target) if target.type == "cuda" else contextlib.nullcontext():
        pipe = DiffusionPipeline.from_pretrained(  # dtype= needs diffusers >= 0.40 (older releases ignore it)
            model, dtype=dtype, use_safetensors=None if opts.allow_pickle else True,
            trust_remote_code=opts.trust_remote_code, revision=opts.revision, **extra,
        )
    _check_dtype(pipe, model, dtype, quantized=opts.quantize is not None)
    if offload:
        enable = pipe.enable_model_cpu_offload if opts.offload == "model" else pipe.enable_sequential_cpu_offload
        enable(device=device)
    elif quantization is None:  # a no-op where device_map placed it (quantised weights stay where they loaded)
        pipe.to(device)
    apply_speed_options(pipe, opts, dtype)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s (%s) on %s", model, type(pipe).__name__, device)
    return pipe


def denoiser(pipe: Any) -> tuple[str, Any]:
    """The pipeline's denoiser: ``("transformer", module)`` or ``("unet", module)``.

    Raises:
        ValueError: for a pipeline with neither.
    """
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if module is not None:
            return name, module
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet")


def _quantization_config(opts: DiffusionOptions, dtype: Any) -> Any:
    """diffusers' `PipelineQuantizationConfig` for a torchao or bitsandbytes ``quantize`` (the denoiser only);
    ``None`` for none, or for ``fp8-storage`` (applied after loading)."""
    if opts.quantize is None or QUANTIZERS[opts.quantize][0] is None:
        return None
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig, TorchAoConfig

    if opts.quantize.startswith("torchao"):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig

        config = TorchAoConfig(Float8DynamicActivationFloat8WeightConfig() if opts.quantize == "torchao-fp8"
                               else Int8WeightOnlyConfig())
    elif opts.quantize == "bnb-nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return PipelineQuantizationConfig(quant_mapping={"transformer": config, "unet": config})


def apply_speed_options(pipe: Any, opts: DiffusionOptions, dtype: Any) -> None:
    """Set the denoiser's attention backend, step cache, float8 storage and compilation (in that order: compile
    last, so it traces the hooks the others install).

    Raises:
        ValueError: when the denoiser cannot take a requested cache.
    """
    import diffusers
    import torch

    name, module = denoiser(pipe)
    if opts.attention_backend is not None:
        module.set_attention_backend(opts.attention_backend.lower())
    if opts.cache is not None:
        if not hasattr(module, "enable_cache"):
            raise ValueError(f"cache={opts.cache}: the {name} of {type(pipe).__name__} ({type(module).__name__}) "
                             f"takes no diffusers step cache")
        config_class = getattr(diffusers, CACHES[opts.cache])
        settings = {"threshold": opts.cache_threshold} if opts.cache_threshold is not None else {}
        module.enable_cache(config_class(**settings))
    if opts.quantize == "fp8-storage":
        module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    if opts.compile:
        if getattr(module, "_repeated_blocks", None):
            module.compile_repeated_blocks()
        else:  # nn.Module.compile: the module's calls go through torch.compile, in place
            module.compile()
