"""Tests for the ``diffusers:<path>`` editor on tiny random pipelines loaded with from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_models import (
    build_tiny_flux_kontext,
    build_tiny_ip2p,
    build_tiny_qwen_edit,
    build_tiny_sd_inpaint,
)

from safetypairs.backends.diffusion_pipelines import work_size
from safetypairs.backends.registry import build_backend, check_options, load_backend


def _editor(arg: str, **options):
    """A ``diffusers:<arg>`` editor built afresh through the registry (``arg``: the model, inline options allowed)."""
    return build_backend("editors", f"diffusers:{arg}", "cpu", **options)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    from skimage import data

    # odd sizes on purpose: the pipelines need multiples of 8 or 16, the output must match exactly
    return [Image.fromarray(data.astronaut()).resize((45, 37)), Image.fromarray(data.chelsea()).resize((52, 40)),
            Image.fromarray(data.coffee()).resize((45, 37))]


@pytest.fixture(scope="module")
def ip2p_path(tmp_path_factory) -> str:
    return build_tiny_ip2p(tmp_path_factory.mktemp("ip2p") / "pipe")


@pytest.fixture(scope="module")
def kontext_path(tmp_path_factory) -> str:
    return build_tiny_flux_kontext(tmp_path_factory.mktemp("kontext") / "pipe")


def _edit(editor, photos, seeds=(1, 2, 3)):
    return editor.edit(photos, ["replace the cat with a dog"] * len(photos), list(seeds))


@pytest.mark.parametrize("which", ["ip2p", "kontext"])
def test_edit_keeps_source_size_and_is_seeded(which, photos, ip2p_path, kontext_path):
    path = ip2p_path if which == "ip2p" else kontext_path
    editor = load_backend("editors", f"diffusers:{path}", "cpu", steps="2", resolution="0")
    assert type(editor.pipe).__name__ == ("StableDiffusionInstructPix2PixPipeline" if which == "ip2p"
                                          else "FluxKontextPipeline")
    out = _edit(editor, photos)
    assert [o.size for o in out] == [p.size for p in photos]
    assert all(o.mode == "RGB" for o in out)
    assert editor.multiple == 2  # tiny VAEs: scale factor 2 (SD) and 1 packed 2x2 (Flux)
    assert out[0].info["work_size"] == list(work_size(photos[0].size, 0, editor.multiple))
    again = _edit(editor, photos)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))
    other = _edit(editor, photos, seeds=(9, 2, 3))
    assert not np.array_equal(np.asarray(out[0]), np.asarray(other[0]))
    assert np.array_equal(np.asarray(out[1]), np.asarray(other[1]))
    alone = editor.edit(photos[1:2], ["replace the cat with a dog"], [2])[0]  # batch composition must not matter
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(out[1], dtype=int)).max() <= 1


def test_options_and_guidance(ip2p_path, kontext_path, photos):
    editor = _editor(ip2p_path, steps=2, guidance="3.0", image_guidance="1.2", resolution="32")
    out = editor.edit(photos[:1], ["x"], [0])[0]
    assert out.size == photos[0].size and out.info["work_size"] == list(work_size((45, 37), 32, 2))
    with pytest.raises(ValueError, match="image_guidance is only for"):
        _editor(kontext_path, image_guidance=1.5)
    with pytest.raises(ValueError, match=r"unknown diffusers option\(s\) \['stepz'\]; allowed: steps, guidance"):
        check_options("editors", "diffusers:some/model", {"stepz": 3})
    with pytest.raises(ValueError, match="diffusers option dtype must be one of auto, float32, float16, bfloat16, "
                                         "got 'float8'"):
        check_options("editors", "diffusers:some/model", {"dtype": "float8"})
    with pytest.raises(ValueError, match="takes no mask"):
        editor.edit(photos[:1], ["x"], [0], masks=[Image.new("L", photos[0].size)])
    with pytest.raises(ValueError, match="same length"):
        editor.edit(photos, ["x"], [0])


def test_inpainting_pipeline_needs_and_uses_masks(tmp_path, photos):
    from datasets import Dataset

    from safetypairs import schema as S

    from safetypairs import statuses as ST
    from safetypairs.edit import EditConfig, run_edit

    path = build_tiny_sd_inpaint(tmp_path / "inpaint")
    editor = load_backend("editors", f"diffusers:{path}", "cpu", steps="2", resolution="0")
    assert editor.needs_mask and type(editor.pipe).__name__ == "StableDiffusionInpaintPipeline"
    with pytest.raises(ValueError, match="inpainting pipeline: every row needs a mask"):
        editor.edit(photos[:1], ["a wooden spoon"], [0])
    masks = [Image.new("L", p.size, 0) for p in photos[:2]]
    masks[0].paste(255, (5, 5, 20, 20))
    masks[1] = None  # a row without a mask becomes that row's error, not a crash
    rows = Dataset.from_dict({S.SOURCE_ID: ["a", "b"], S.IMAGE: photos[:2], "mask": masks,
                              S.INSTRUCTION: ["a wooden spoon"] * 2})
    out, result = run_edit(rows, EditConfig(editor=f"diffusers:{path}", control=False, device="cpu",
                                            editor_options=(("steps", "2"), ("resolution", "0")), mask_column="mask"))
    assert out[S.EDIT_STATUS] == [ST.OK, "unreadable"] and "missing image" in out[S.EDIT_ERROR][1]
    assert out[0][S.EDITED_IMAGE].size == photos[0].size


def test_unsupported_pipeline_and_missing_model(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="not supported; supported: StableDiffusionInstructPix2PixPipeline"):
        _editor(str(tmp_path))
    with pytest.raises(ValueError, match="diffusers needs <hub id or local path> after 'diffusers:'"):
        build_backend("editors", "diffusers")
    with pytest.raises(OSError):
        _editor(str(tmp_path / "missing"))


def test_work_size():
    assert work_size((45, 37), 0, 8) == (48, 40)
    assert work_size((1000, 500), 512, 16) == (720, 368)
    assert work_size((3, 3), 0, 16) == (16, 16)


@pytest.mark.slow
def test_qwen_image_edit(tmp_path, photos):
    """~30 s on 2 CPU cores: QwenImageEdit conditions on a ~1 megapixel copy of the source."""
    path = build_tiny_qwen_edit(tmp_path / "qwen")
    editor = _editor(path, steps=2, resolution=32, guidance=2.0)
    out = editor.edit(photos[:1], ["replace the cat with a dog"], [0])
    assert out[0].size == photos[0].size


def test_options_inline_in_the_spec(ip2p_path):
    editor = _editor(f"{ip2p_path},steps=3,resolution=0", guidance="2.5")
    assert (editor.options.steps, editor.options.resolution, editor.options.guidance) == (3, 0, 2.5)
    with pytest.raises(ValueError, match="unknown diffusers option"):
        _editor(f"{ip2p_path},stepz=3")


class _Recorder:
    """Wraps a pipeline and records each call's keyword arguments."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):  # the pipeline's components (vae, transformer) as the editor reads them
        return getattr(self.pipe, name)


def test_kontext_runs_at_the_model_cards_guidance(kontext_path, photos):
    editor = _editor(kontext_path, steps=1, resolution=16)
    editor.pipe = recorder = _Recorder(editor.pipe)
    editor.edit(photos[:1], ["x"], [0])
    assert recorder.calls[0]["guidance_scale"] == 2.5 and "strength" not in recorder.calls[0]
    editor = _editor(kontext_path, steps=1, resolution=16, guidance=4.0)
    editor.pipe = recorder = _Recorder(editor.pipe)
    editor.edit(photos[:1], ["x"], [0])
    assert recorder.calls[0]["guidance_scale"] == 4.0
    with pytest.raises(ValueError, match="strength is only for inpainting"):
        _editor(kontext_path, strength=0.5)


def test_inpainting_strength_reaches_the_pipeline(tmp_path, photos):
    path = build_tiny_sd_inpaint(tmp_path / "inpaint")
    mask = Image.new("L", photos[0].size, 0)
    mask.paste(255, (5, 5, 20, 20))
    seen = []
    for options, expected in (({}, 1.0), ({"strength": "0.7"}, 0.7)):
        editor = _editor(path, steps=2, resolution=0, **options)
        editor.pipe = recorder = _Recorder(editor.pipe)
        seen.append(editor.edit(photos[:1], ["a wooden spoon"], [0], masks=[mask])[0])
        assert recorder.calls[0]["strength"] == expected
    assert not np.array_equal(np.asarray(seen[0]), np.asarray(seen[1]))  # the pipeline really used it
    with pytest.raises(ValueError, match=r"invalid diffusers option value\(s\): strength=1.5 \(allowed: \(0, 1\]\)"):
        check_options("editors", f"diffusers:{path},strength=1.5")


def test_requested_dtype_is_the_loaded_dtype(ip2p_path, monkeypatch):
    import diffusers
    import torch

    editor = _editor(ip2p_path, dtype="bfloat16")
    assert editor.pipe.unet.dtype == torch.bfloat16 and editor.pipe.vae.dtype == torch.bfloat16
    real = diffusers.DiffusionPipeline.from_pretrained.__func__

    def old_diffusers(cls, *args, dtype=None, **kwargs):  # a release that ignores dtype=
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(old_diffusers))
    with pytest.raises(ValueError, match="the unet loaded as torch.float32, not the requested torch.bfloat16"):
        _editor(ip2p_path, dtype="bfloat16")


def test_component_without_safetensors_needs_the_opt_in(tmp_path):
    import torch
    from safetensors.torch import load_file

    path = tmp_path / "pickled"
    build_tiny_ip2p(path)
    weights = path / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), path / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match="component.s. text_encoder ship no safetensors.*allow_pickle=true"):
        _editor(str(path))
    editor = _editor(f"{path},allow_pickle=true")
    assert type(editor.pipe).__name__ == "StableDiffusionInstructPix2PixPipeline"


def test_speed_options_are_checked_before_any_model_loads(kontext_path):
    import importlib.util

    with pytest.raises(ValueError, match="diffusers option cache must be one of first_block, taylorseer, sea, got "):
        check_options("editors", "diffusers:some/model,cache=mag")
    with pytest.raises(ValueError, match="cache_threshold needs a cache"):
        check_options("editors", "diffusers:some/model,cache_threshold=0.1")
    with pytest.raises(ValueError, match="attention_backend='fastest' is not a diffusers .* backend; allowed: flash"):
        check_options("editors", "diffusers:some/model,attention_backend=fastest")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="attention_backend=flash: .*flash-attn"):
            check_options("editors", "diffusers:some/model,attention_backend=flash")
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(ValueError, match=r"quantize=torchao-fp8 needs torchao, which is not installed"):
            check_options("editors", "diffusers:some/model", {"quantize": "torchao-fp8"})
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match=r"quantize=bnb-nf4 needs bitsandbytes"):
            _editor(kontext_path, quantize="bnb-nf4")  # refused before from_pretrained
    check_options("editors", "diffusers:some/model,cache=first_block,cache_threshold=0.1,quantize=fp8-storage,"
                             "compile=true,attention_backend=native,max_batch=2,vae_tiling=off")


def test_speed_options_apply_to_the_denoiser(kontext_path, photos):
    import diffusers
    import torch

    editor = _editor(kontext_path, steps=2, resolution=16, attention_backend="_native_math", cache="first_block",
                     cache_threshold=0.2, quantize="fp8-storage")
    transformer = editor.pipe.transformer
    backends = {getattr(m.processor, "_attention_backend", None)
                for m in transformer.modules() if hasattr(m, "processor")}
    assert backends == {diffusers.models.attention_dispatch.AttentionBackendName._NATIVE_MATH}
    assert isinstance(transformer._cache_config, diffusers.FirstBlockCacheConfig)
    assert transformer._cache_config.threshold == 0.2
    assert transformer.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn  # stored in float8
    editor.pipe = recorder = _Recorder(editor.pipe)
    same = [photos[0]] * 3  # one size: without a cache, one call
    out = editor.edit(same, ["x"] * 3, [1, 2, 1])
    assert [len(c["prompt"]) for c in recorder.calls] == [1, 1, 1]  # with a cache, one image per call
    assert np.array_equal(np.asarray(out[0]), np.asarray(out[2])) and out[0].size == photos[0].size
    plain = _editor(kontext_path, steps=2, resolution=16)
    plain.pipe = recorder = _Recorder(plain.pipe)
    plain.edit(same, ["x"] * 3, [1, 2, 1])
    assert [len(c["prompt"]) for c in recorder.calls] == [3]


def test_max_batch_caps_the_images_of_one_call(ip2p_path, photos):
    editor = _editor(ip2p_path, steps=1, resolution=16, max_batch=2)
    editor.pipe = recorder = _Recorder(editor.pipe)
    editor.edit([photos[0]] * 5, ["x"] * 5, [0, 1, 2, 3, 4])
    assert [len(c["prompt"]) for c in recorder.calls] == [2, 2, 1]


def test_vae_slicing_and_tiling_follow_the_working_size(ip2p_path):
    editor = _editor(ip2p_path, steps=1)
    vae = editor.pipe.vae
    for n, size, slicing, tiling in ((2, (512, 512), True, False), (1, (512, 512), False, False),
                                     (4, (511, 512), False, False), (1, (2048, 2049), False, True)):
        editor._set_vae(n, size)
        assert (vae.use_slicing, vae.use_tiling) == (slicing, tiling), (n, size)
    editor = _editor(ip2p_path, steps=1, vae_slicing="on", vae_tiling="off")
    editor._set_vae(1, (4096, 4096))
    assert (editor.pipe.vae.use_slicing, editor.pipe.vae.use_tiling) == (True, False)


def test_the_pipeline_loads_straight_onto_its_device(ip2p_path, monkeypatch):
    import diffusers

    real, seen = diffusers.DiffusionPipeline.from_pretrained.__func__, []

    def recording(cls, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(recording))
    editor = _editor(ip2p_path)
    assert (seen[0]["device_map"], seen[0]["low_cpu_mem_usage"]) == ("cpu", True)
    assert editor.pipe.unet.device.type == "cpu"


def test_compile_wraps_the_repeated_blocks_and_keeps_the_outputs(kontext_path, photos, monkeypatch):
    """Dynamo traces each block for real; its ``eager`` backend stands in for inductor's code generation, which
    takes minutes on this machine's CPU (benchmarks/bench_gpu.py measures the real compile)."""
    import torch

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, backend="eager", **kw))
    torch._dynamo.reset()
    plain = _editor(kontext_path, steps=2, resolution=16).edit(photos[:1], ["x"], [3])[0]
    editor = _editor(kontext_path, steps=2, resolution=16, compile=True)
    blocks = [*editor.pipe.transformer.transformer_blocks, *editor.pipe.transformer.single_transformer_blocks]
    assert all(b._compiled_call_impl is not None for b in blocks)
    compiled = editor.edit(photos[:1], ["x"], [3])[0]
    assert np.abs(np.asarray(compiled, dtype=int) - np.asarray(plain, dtype=int)).max() <= 1


def test_a_cache_is_refused_for_a_unet_pipeline_before_loading(ip2p_path, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", None)  # loading would fail differently
    with pytest.raises(ValueError, match=r"cache=first_block: the unet of StableDiffusionInstructPix2PixPipeline "
                                         r"\(UNet2DConditionModel\) takes no diffusers step cache"):
        _editor(ip2p_path, cache="first_block")


@pytest.mark.slow
def test_compile_with_inductor_keeps_the_outputs(kontext_path, photos):
    """40 s to 2 min on 2 shared CPU cores: inductor generates and builds C++ for each block (skipped where it cannot)."""
    import torch

    torch._dynamo.reset()
    plain = _editor(kontext_path, steps=2, resolution=16).edit(photos[:1], ["x"], [3])[0]
    editor = _editor(kontext_path, steps=2, resolution=16, compile=True)
    try:
        compiled = editor.edit(photos[:1], ["x"], [3])[0]
    except Exception as err:  # noqa: BLE001 - no C++ compiler here: say so instead of failing
        if "inductor" in type(err).__module__ or "CppCompileError" in type(err).__name__:
            pytest.skip(f"torch.compile's inductor cannot build here: {type(err).__name__}")
        raise
    assert np.abs(np.asarray(compiled, dtype=int) - np.asarray(plain, dtype=int)).max() <= 1
