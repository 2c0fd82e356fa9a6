"""Editor backend ``diffusers:<model id or path>``: instruction-based and mask-guided diffusers pipelines."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from PIL import Image

from safetypairs.backends.diffusion_pipelines import (
    DIFFUSION_OPTIONS,
    PIPELINES,
    REPLACE_STRENGTH,
    SLICE_PIXELS,
    TILE_PIXELS,
    DiffusionOptions,
    PipelineFamily,
    check_speed_options,
    components_without_safetensors,
    denoiser,
    load_pipeline,
    model_index,
    torch_dtype,
    work_size,
)
from safetypairs.backends.options import HUB_MODEL


class BlockedOutputError(RuntimeError):
    """The pipeline's own safety checker blacked out some outputs."""


class DiffusersEditor:
    """``diffusers:<model id or local path>``: edits with the pipeline named in ``model_index.json``.

    Supported pipeline classes are the keys of `PIPELINES` (any class with
    ``trust_remote_code``). Mask-guided (inpainting) pipelines need ``masks`` in `edit`.
    Outputs are resized back to exactly each source's size; the working size is kept in the
    returned image's ``info["work_size"]``.
    """

    ARGUMENT = HUB_MODEL
    OPTIONS = DIFFUSION_OPTIONS
    # options that change outputs beyond numerical noise: a run that sets them is named by them (`edit.editor_name`)
    APPROXIMATIONS = ("cache", "quantize")
    takes_mask = True  # inpainting pipelines need masks; instruction pipelines refuse them per call

    def __init__(self, pipe: Any, model: str, family: PipelineFamily, options: DiffusionOptions) -> None:
        self.pipe = pipe
        self.model = model
        self.family = family
        self.options = options
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
    def check_options(cls, arg: str, **options: Any) -> None:
        """Check the speed options against the installed packages (`check_speed_options`), loading no model."""
        check_speed_options(DiffusionOptions(**options))

    @classmethod
    def from_spec(cls, arg: str, device: str = "cpu", **options: Any) -> "DiffusersEditor":
        """Load the pipeline (safetensors only) onto ``device``.

        Args:
            arg: a hub model id or a ``save_pretrained`` folder.
            device: torch device string.
            **options: every option of `DIFFUSION_OPTIONS`, checked and cast by the registry.

        Returns:
            The editor.

        Raises:
            ValueError: for an unsupported pipeline class, pickle-only components or a speed option the installed
                packages cannot honour (`check_speed_options`).
        """
        model = arg
        opts = DiffusionOptions(**options)
        check_speed_options(opts)
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
        _check_denoiser_takes(index, opts)
        pipe = load_pipeline(model, device, opts, has_checker="safety_checker" in index)
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
        """Indices of the images that run in one pipeline call: the same working size, at most ``max_batch``; one
        image per call with a step cache (its skips are decided on the whole call's activations, so a batched image's
        edit would depend on the images beside it)."""
        if not self.family.batched or self.options.cache is not None:
            return [[i] for i in range(len(sizes))]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        cap = self.options.max_batch
        return [group[k:k + cap] for group in groups.values() for k in range(0, len(group), cap)]

    def _set_vae(self, n: int, size: tuple[int, int]) -> None:
        """VAE slicing and tiling for a call of ``n`` images at ``size`` (``auto``: `SLICE_PIXELS`, `TILE_PIXELS`)."""
        vae = getattr(self.pipe, "vae", None)
        pixels = size[0] * size[1]
        for mode, auto, attribute in ((self.options.vae_slicing, n > 1 and pixels >= SLICE_PIXELS, "slicing"),
                                      (self.options.vae_tiling, pixels > TILE_PIXELS, "tiling")):
            if hasattr(vae, f"use_{attribute}"):
                on = mode == "on" or (mode == "auto" and auto)
                getattr(vae, f"{'enable' if on else 'disable'}_{attribute}")()

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
        self._set_vae(len(group), size)
        try:
            with torch.inference_mode(), self._cache_context():
                result = self.pipe(**kwargs)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        flagged = getattr(result, "nsfw_content_detected", None) or []
        if any(flagged):
            raise BlockedOutputError(f"the pipeline's safety checker blocked {sum(map(bool, flagged))} output(s)")
        return list(result.images)

    def _cache_context(self) -> Any:
        """With a step cache, the context its hooks need around the denoiser's calls: pipelines that name their own
        (Qwen: ``cond``/``uncond``) override it per call; FLUX.1 Kontext's pipeline sets none, and runs one
        (guidance-distilled) denoiser call per step, all ``cond``. The cache's state is reset at the end of each
        pipeline call (``maybe_free_model_hooks``)."""
        if self.options.cache is None:
            return contextlib.nullcontext()
        return denoiser(self.pipe)[1].cache_context("cond")

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
    def roundtrip_reference(cls, arg: str, device: str = "cpu", **options: Any) -> "VAERoundTrip":
        """The editor's VAE alone, for VAE-aware validation (see `VAERoundTrip`); it gets what `from_spec` gets
        (`registry.from_spec_arguments`)."""
        return VAERoundTrip.load(arg, device, DiffusionOptions(**options))


def _check_denoiser_takes(index: dict[str, Any], opts: DiffusionOptions) -> None:
    """Refuse a step cache for a pipeline whose denoiser class (from ``model_index.json``) has no ``enable_cache``
    (UNet pipelines), before the weights load.

    Raises:
        ValueError: naming the option, the denoiser class and the pipeline class.
    """
    import diffusers

    if opts.cache is None:
        return
    for name in ("transformer", "unet"):
        library, class_name = (index.get(name) or [None, None])[:2]
        if library == "diffusers" and not hasattr(getattr(diffusers, str(class_name), None), "enable_cache"):
            raise ValueError(f"cache={opts.cache}: the {name} of {index.get('_class_name')} ({class_name}) takes no "
                             f"diffusers step cache")


def _to_source_size(image: Image.Image, size: tuple[int, int], work: tuple[int, int]) -> Image.Image:
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    image.info["work_size"] = list(work)
    return image


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
    def load(cls, model: str, device: str, opts: DiffusionOptions) -> "VAERoundTrip":
        """Load the ``vae`` subfolder of a diffusers pipeline.

        Args:
            model: a hub model id or a ``save_pretrained`` folder.
            device: torch device string.
            opts: the editor's settings (revision, dtype and resolution are used).

        Raises:
            ValueError: for a pipeline without a diffusers VAE.
        """
        import diffusers

        index = model_index(model, opts.revision)
        library, class_name = (index.get("vae") or [None, None])[:2]
        if library != "diffusers" or not hasattr(diffusers, str(class_name)):
            raise ValueError(f"{model!r} has no diffusers VAE component (vae: {index.get('vae')})")
        vae = getattr(diffusers, class_name).from_pretrained(
            model, subfolder="vae", torch_dtype=torch_dtype(opts.dtype, device), use_safetensors=True,
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
