"""Editor backend ``diffusers:<model id or path>``: instruction-based and mask-guided diffusers pipelines."""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from safetypairs.backends.vlm import DTYPES
from safetypairs.registry import parse_bool, split_model_arg

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


def _optional(kind: type) -> Any:
    return lambda v: None if v is None or str(v).lower() in ("", "none", "default") else kind(v)


@dataclass(frozen=True)
class DiffusionOptions:
    """Options of the ``diffusers`` editor (given as backend options, strings are coerced).

    Attributes:
        steps: denoising steps; ``None`` keeps the pipeline's default.
        guidance: text guidance (``guidance_scale``, or ``true_cfg_scale`` for Qwen); ``None`` = the
            family's model-card value (FLUX.1 Kontext: 2.5), else the pipeline's default.
        image_guidance: image guidance (InstructPix2Pix ``image_guidance_scale`` only).
        strength: how far inpainting pipelines re-noise the masked area (0 < strength <= 1);
            ``None`` = ``REPLACE_STRENGTH`` (1.0) for pipelines that take it.
        resolution: working resolution (side of the equal-area square); ``None`` = the pipeline
            family's default, ``0`` = the source size rounded to the pipeline's multiple.
        dtype: one of ``DTYPES``; ``auto`` is bfloat16 on CUDA (float16 without bf16 support), float32 on CPU.
        offload: one of ``OFFLOADS`` (diffusers model / sequential CPU offload; CUDA only).
        trust_remote_code: allow custom pipeline code from the model repo.
        revision: a hub revision (branch, tag or commit).
        safety_checker: keep the pipeline's own NSFW safety checker when it ships one
            (its flagged outputs are black images, reported as an error for that row).
        allow_pickle: load components that ship only pickle weights (``.bin``/``.pt``, which can
            run code when loaded); off by default: such a component is an error naming it.
    """

    steps: int | None = None
    guidance: float | None = None
    image_guidance: float | None = None
    strength: float | None = None
    resolution: int | None = None
    dtype: str = "auto"
    offload: str = "none"
    trust_remote_code: bool = False
    revision: str | None = None
    safety_checker: bool = True
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"diffusers dtype {self.dtype!r} not allowed; allowed: {', '.join(DTYPES)}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"diffusers offload {self.offload!r} not allowed; allowed: {', '.join(OFFLOADS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"diffusers steps must be >= 1, got {self.steps}")
        if self.resolution is not None and self.resolution < 0:
            raise ValueError(f"diffusers resolution must be >= 0, got {self.resolution}")
        if self.strength is not None and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"diffusers strength must be in (0, 1], got {self.strength}")

    @classmethod
    def parse(cls, options: dict[str, Any]) -> "DiffusionOptions":
        """Build from backend options (values may be strings, e.g. from ``parse_options``).

        Raises:
            ValueError: for an unknown option (naming the allowed ones) or a bad value.
        """
        casts = {"steps": _optional(int), "guidance": _optional(float), "image_guidance": _optional(float),
                 "strength": _optional(float), "resolution": _optional(int), "dtype": str, "offload": str,
                 "trust_remote_code": lambda v: parse_bool(v, "trust_remote_code"),
                 "revision": _optional(str), "safety_checker": lambda v: parse_bool(v, "safety_checker"),
                 "allow_pickle": lambda v: parse_bool(v, "allow_pickle")}
        unknown = set(options) - set(casts)
        if unknown:
            raise ValueError(f"unknown diffusers option(s) {sorted(unknown)}; allowed: {', '.join(casts)}")
        try:
            return cls(**{k: casts[k](v) for k, v in options.items()})
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad diffusers option value in {options}: {err}") from err


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


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name != "auto":
        return getattr(torch, name)
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class BlockedOutputError(RuntimeError):
    """The pipeline's own safety checker blacked out some outputs."""


class DiffusersEditor:
    """``diffusers:<model id or local path>``: edits with the pipeline named in ``model_index.json``.

    Supported pipeline classes are the keys of `PIPELINES` (any class with
    ``trust_remote_code``). Mask-guided (inpainting) pipelines need ``masks`` in `edit`.
    Outputs are resized back to exactly each source's size; the working size is kept in the
    returned image's ``info["work_size"]``.
    """

    OPTIONS = {
        "steps": "denoising steps (default: the pipeline's)",
        "guidance": "text guidance scale (true_cfg_scale for Qwen; default: the pipeline's)",
        "image_guidance": "image guidance scale (InstructPix2Pix only)",
        "resolution": "working resolution, side of the equal-area square (0: the source size)",
        "dtype": "auto, float32, float16 or bfloat16 (auto: bfloat16 on CUDA, float32 on CPU)",
        "offload": "none, model or sequential CPU offload (CUDA only)",
        "trust_remote_code": "allow custom pipeline code from the model repo (default false)",
        "revision": "hub revision (branch, tag or commit)",
        "safety_checker": "keep the pipeline's own NSFW checker when it ships one (default true)",
        "strength": "inpainting pipelines only: how far the masked region is re-noised (0..1; default 1.0)",
        "allow_pickle": "load components that ship only pickle weights (.bin/.pt; default false: safetensors only)",
    }
    takes_mask = True  # inpainting pipelines need masks; instruction pipelines refuse them per call

    def __init__(self, pipe: Any, model: str, family: PipelineFamily, options: DiffusionOptions) -> None:
        self.pipe = pipe
        self.model = model
        self.family = family
        self.options = options
        self.spec = f"diffusers:{model}"
        self._params = set(inspect.signature(type(pipe).__call__).parameters)
        self.needs_mask = "mask_image" in self._params
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.multiple = factor * 2 if family.packed else factor
        if options.image_guidance is not None and "image_guidance_scale" not in self._params:
            raise ValueError(f"image_guidance is only for pipelines with image_guidance_scale "
                             f"(InstructPix2Pix), not {type(pipe).__name__}")
        if options.strength is not None and not (self.needs_mask and "strength" in self._params):
            raise ValueError(f"strength is only for inpainting pipelines that take it, not {type(pipe).__name__}")

    @classmethod
    def check_options(cls, arg: str | None, **options: Any) -> None:
        """Check the model argument and the option names and values, loading nothing.

        Raises:
            ValueError: for a missing model or a bad option, naming it.
        """
        _, inline = split_model_arg(arg, "diffusers")
        DiffusionOptions.parse({**inline, **options})

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **options: Any) -> "DiffusersEditor":
        """Load the pipeline (safetensors only) onto ``device``.

        Args:
            arg: ``<hub model id or save_pretrained folder>[,key=value,...]``.
            device: torch device string.
            **options: `DiffusionOptions` fields (strings are coerced; also accepted inline in ``arg``,
                these win).

        Returns:
            The editor.

        Raises:
            ValueError: for a missing model, bad options or an unsupported pipeline class.
        """
        model, inline = split_model_arg(arg, "diffusers")
        opts = DiffusionOptions.parse({**inline, **options})
        index = model_index(model, opts.revision)
        class_name = index.get("_class_name")
        family = PIPELINES.get(class_name) if isinstance(class_name, str) else None
        if family is None and not opts.trust_remote_code:
            raise ValueError(f"pipeline class {class_name!r} of {model!r} is not supported; supported: "
                             f"{', '.join(PIPELINES)} (or pass trust_remote_code for a custom pipeline)")
        pickled = components_without_safetensors(model, index, opts.revision)
        if pickled and not opts.allow_pickle:
            raise ValueError(f"{model!r}: component(s) {', '.join(pickled)} ship no safetensors weights, only "
                             f"pickle files (.bin/.pt) that can run code when loaded; pass allow_pickle=true "
                             f"to load them anyway")
        pipe = _load_pipeline(model, device, opts, has_checker="safety_checker" in index)
        return cls(pipe, model, family or PipelineFamily(1024, packed=False, batched=False), opts)

    def edit(
        self,
        images: list[Image.Image],
        instructions: list[str],
        seeds: list[int],
        masks: list[Image.Image | None] | None = None,
    ) -> list[Image.Image]:
        """Edit each image with its instruction and seed (one ``torch.Generator`` per image).

        Images that share a working size run in one pipeline call (unless the family is not
        batched); results are independent of the batch because each image has its own generator.

        Args:
            images: RGB sources.
            instructions: one edit instruction (prompt) per image.
            seeds: one seed per image.
            masks: for inpainting pipelines, one mask per image (white = repaint).

        Returns:
            Edited RGB images, each exactly its source's size.

        Raises:
            ValueError: for mismatched lengths or a missing/unexpected mask.
            BlockedOutputError: when the pipeline's safety checker blacked out an output.
        """
        n = len(images)
        if len(instructions) != n or len(seeds) != n or (masks is not None and len(masks) != n):
            raise ValueError("images, instructions, seeds (and masks) must have the same length")
        if self.needs_mask and (masks is None or any(m is None for m in masks)):
            raise ValueError(f"{type(self.pipe).__name__} is an inpainting pipeline: every row needs a mask")
        if not self.needs_mask and masks is not None and any(m is not None for m in masks):
            raise ValueError(f"{type(self.pipe).__name__} takes no mask; use an inpainting pipeline or drop the mask")
        resolution = self.family.resolution if self.options.resolution is None else self.options.resolution
        sizes = [work_size(img.size, resolution, self.multiple) for img in images]
        out: list[Image.Image | None] = [None] * n
        for group in self._groups(sizes):
            edited = self._run(group, sizes[group[0]], images, instructions, seeds, masks)
            for i, img in zip(group, edited):
                out[i] = _to_source_size(img, images[i].size, sizes[i])
        return out  # type: ignore[return-value]

    def _groups(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        if not self.family.batched:
            return [[i] for i in range(len(sizes))]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        return list(groups.values())

    def _run(self, group, size, images, instructions, seeds, masks) -> list[Image.Image]:
        import torch

        kwargs = self._call_kwargs(size)
        kwargs["prompt"] = [instructions[i] for i in group]
        kwargs["image"] = [images[i].convert("RGB").resize(size, Image.Resampling.LANCZOS) for i in group]
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in group]
        if self.family.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.family.negative_prompt] * len(group)
        if self.needs_mask:
            kwargs["mask_image"] = [masks[i].convert("L").resize(size, Image.Resampling.NEAREST) for i in group]
        if not self.family.batched:  # one image per call: plain values, not lists
            kwargs = {k: v[0] if isinstance(v, list) else v for k, v in kwargs.items()}
        try:
            with torch.inference_mode():
                result = self.pipe(**kwargs)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        flagged = getattr(result, "nsfw_content_detected", None) or []
        if any(flagged):
            raise BlockedOutputError(f"the pipeline's safety checker blocked {sum(map(bool, flagged))} output(s)")
        return list(result.images)

    def _call_kwargs(self, size: tuple[int, int]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"output_type": "pil"}
        if self.options.steps is not None:
            kwargs["num_inference_steps"] = self.options.steps
        guidance = self.family.guidance if self.options.guidance is None else self.options.guidance
        if guidance is not None:
            kwargs[self.family.cfg_arg] = guidance
        if "strength" in self._params and self.needs_mask:
            kwargs["strength"] = REPLACE_STRENGTH if self.options.strength is None else self.options.strength
        if self.options.image_guidance is not None:
            kwargs["image_guidance_scale"] = self.options.image_guidance
        if "height" in self._params:
            kwargs["width"], kwargs["height"] = size
        if "max_area" in self._params:
            kwargs["max_area"] = size[0] * size[1]
        if "_auto_resize" in self._params:
            kwargs["_auto_resize"] = False
        return kwargs

    @classmethod
    def roundtrip_reference(cls, arg: str | None, device: str = "cpu") -> "VAERoundTrip":
        """The editor's VAE alone, for VAE-aware validation (see `VAERoundTrip`)."""
        return VAERoundTrip.from_spec(arg, device)


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


def _to_source_size(image: Image.Image, size: tuple[int, int], work: tuple[int, int]) -> Image.Image:
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    image.info["work_size"] = list(work)
    return image


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


def _load_pipeline(model: str, device: str, opts: DiffusionOptions, has_checker: bool) -> Any:
    """``DiffusionPipeline.from_pretrained`` (safetensors unless ``allow_pickle``), then device or offload set-up.

    Raises:
        ValueError: when the denoiser did not load in the requested dtype.
    """
    from diffusers import DiffusionPipeline

    extra: dict[str, Any] = {}
    if has_checker and not opts.safety_checker:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    dtype = _torch_dtype(opts.dtype, device)
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


class VAERoundTrip:
    """The original through an editor's own VAE (encode, decode with the latent mean), at the editor's
    working size: the reference validation compares a ``diffusers:`` edit with when there is no control.

    Only the ``vae`` component is loaded (safetensors), so this is cheap next to the whole pipeline.
    """

    def __init__(self, vae: Any, family: PipelineFamily, options: DiffusionOptions) -> None:
        self.vae = vae
        self.family = family
        self.options = options
        config = vae.config
        self.video = "temperal_downsample" in config  # Qwen-Image's VAE takes (B, C, frames, H, W)
        factor = 2 ** len(config.temperal_downsample) if self.video else 2 ** (len(config.block_out_channels) - 1)
        self.multiple = factor * 2 if family.packed else factor

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu") -> "VAERoundTrip":
        """Load the ``vae`` subfolder of a ``diffusers:<model>[,options]`` spec's pipeline.

        Raises:
            ValueError: for a missing model, bad options or a pipeline without a diffusers VAE.
        """
        import diffusers

        model, inline = split_model_arg(arg, "diffusers")
        opts = DiffusionOptions.parse(inline)
        index = model_index(model, opts.revision)
        library, class_name = (index.get("vae") or [None, None])[:2]
        if library != "diffusers" or not hasattr(diffusers, str(class_name)):
            raise ValueError(f"{model!r} has no diffusers VAE component (vae: {index.get('vae')})")
        vae = getattr(diffusers, class_name).from_pretrained(
            model, subfolder="vae", torch_dtype=_torch_dtype(opts.dtype, device), use_safetensors=True,
            revision=opts.revision)
        family = PIPELINES.get(index.get("_class_name"), PipelineFamily(1024, packed=False))
        return cls(vae.to(device).eval(), family, opts)

    def __call__(self, images: list[Image.Image], work_sizes: list[Any] | None = None) -> list[Image.Image]:
        """Round-trip each image at its working size and resize it back to its own size.

        Args:
            images: RGB originals.
            work_sizes: the ``[w, h]`` the editor ran at per image (``edit_work_size``); ``None``
                entries use the size the editor would pick.

        Returns:
            One RGB image per input, each its source's size.
        """
        import numpy as np
        import torch

        resolution = self.family.resolution if self.options.resolution is None else self.options.resolution
        sizes = work_sizes or [None] * len(images)
        out = []
        for image, size in zip(images, sizes):
            size = tuple(size) if size else work_size(image.size, resolution, self.multiple)
            arr = np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
            x = torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)[None].to(self.vae.device, self.vae.dtype)
            x = x[:, :, None] if self.video else x
            with torch.inference_mode():
                y = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
            y = (y[:, :, 0] if self.video else y)[0].float().clamp(-1, 1)
            pixels = ((y.permute(1, 2, 0).cpu().numpy() + 1.0) * 127.5 + 0.5).astype(np.uint8)
            out.append(_to_source_size(Image.fromarray(pixels), image.size, size))
        return out
