"""Encoder backends: spatial LPIPS, open_clip and hf-clip image embeddings (tiny offline models)."""

import numpy as np
import pytest
from PIL import Image
from tiny_models import build_tiny_hf_clip, register_tiny_open_clip

from safetypairs.backends.encoders import (
    HFCLIPEncoder,
    LPIPSEncoder,
    OpenCLIPEncoder,
    open_clip_arguments,
)
from safetypairs.backends.registry import REGISTRY, build_backend, from_spec_arguments, load_backend
from safetypairs.policy import load_policy


@pytest.fixture(scope="module")
def photo():
    from safetypairs.sources import demo_photo

    return demo_photo("astronaut").resize((96, 96))


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def test_encoders_are_registered():
    assert REGISTRY["encoders"] == {
        "lpips": "safetypairs.backends.encoders:LPIPSEncoder",
        "open_clip": "safetypairs.backends.encoders:OpenCLIPEncoder",
        "hf-clip": "safetypairs.backends.encoders:HFCLIPEncoder",
        "ocr-text": "safetypairs.backends.ocr_text:OCRTextEncoder",
    }


def test_lpips_spec_default_uses_real_weights():
    assert from_spec_arguments("encoders", "lpips") == ("alex", {"pnet_rand": False})
    assert from_spec_arguments("encoders", "lpips:vgg") == ("vgg", {"pnet_rand": False})
    assert from_spec_arguments("encoders", "lpips:squeeze,pnet_rand=true") == ("squeeze", {"pnet_rand": True})
    assert from_spec_arguments("encoders", "lpips:pnet_rand=1") == ("alex", {"pnet_rand": True})
    with pytest.raises(ValueError, match="unknown lpips <net> 'resnet'; allowed: alex, vgg, squeeze"):
        from_spec_arguments("encoders", "lpips:resnet")
    with pytest.raises(ValueError, match=r"unknown lpips option\(s\) \['depth'\]; allowed: pnet_rand"):
        from_spec_arguments("encoders", "lpips:alex,depth=3")


def test_lpips_spatial_map_is_local(photo):
    enc = load_backend("encoders", "lpips:alex,pnet_rand=true", "cpu")
    assert isinstance(enc, LPIPSEncoder) and enc.name == "lpips:alex,pnet_rand" and enc.min_side == 32
    edited = _arr(photo).copy()
    edited[60:90, 60:90] = 0.0
    same, changed = enc.distance_maps([_arr(photo), _arr(photo)], [_arr(photo), edited])
    assert same.shape == changed.shape == (96, 96)
    assert np.allclose(same, 0.0, atol=1e-6)
    assert changed[60:90, 60:90].mean() > 3 * changed[:30, :30].mean()


def test_lpips_mixed_sizes_and_errors(photo):
    enc = load_backend("encoders", "lpips:squeeze,pnet_rand=true", "cpu")
    small = _arr(photo.resize((40, 48)))
    maps = enc.distance_maps([small, _arr(photo)], [small, _arr(photo)])
    assert [m.shape for m in maps] == [(48, 40), (96, 96)]
    with pytest.raises(ValueError, match=">= 24px"):
        enc.distance_maps([small[:16, :16]], [small[:16, :16]])


def test_open_clip_tiny_random_and_checkpoint(tmp_path, photo):
    import torch

    arch = register_tiny_open_clip(tmp_path)
    enc = load_backend("encoders", f"open_clip:{arch}/none", "cpu")
    assert isinstance(enc, OpenCLIPEncoder) and enc.name == f"open_clip:{arch}/none"
    emb = enc.embed([photo, photo.resize((50, 30)), photo.rotate(90)])
    assert emb.shape == (3, 32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(enc.model.state_dict(), checkpoint)
    reloaded = build_backend("encoders", f"open_clip:{arch}/{checkpoint}")
    assert np.allclose(reloaded.embed([photo]), emb[:1], atol=1e-5)
    with pytest.raises(ValueError, match=r"open_clip needs <arch>/<pretrained> \(e.g. ViT-B-32/openai\)"):
        build_backend("encoders", "open_clip")


def test_open_clip_spec_grammar_and_quickgelu_from_the_tag():
    assert open_clip_arguments("ViT-B-32/openai") == ("ViT-B-32", "openai", True)  # trained with QuickGELU
    assert open_clip_arguments("ViT-B-32/laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k", False)
    assert open_clip_arguments("ViT-B-32-quickgelu/openai")[2] is False  # the config already has it
    assert open_clip_arguments("RN50/none") == ("RN50", None, False)
    assert open_clip_arguments("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == (
        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None, False)
    assert open_clip_arguments("local-dir:/models/clip") == ("local-dir:/models/clip", None, False)
    with pytest.raises(ValueError, match="needs a repo or folder"):
        open_clip_arguments("hf-hub:")


def test_open_clip_quickgelu_tag_builds_quickgelu(tmp_path, monkeypatch, recwarn):
    import open_clip
    import torch

    arch = register_tiny_open_clip(tmp_path)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(OpenCLIPEncoder.from_spec(f"{arch}/none").model.state_dict(), checkpoint)
    tags = {"quickgelu_run": {"file": str(checkpoint), "quick_gelu": True}, "gelu_run": {"file": str(checkpoint)}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, arch, tags)  # a tag table like the built-in ones

    def activations(enc):
        return {type(m).__name__ for m in enc.model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}

    assert activations(OpenCLIPEncoder.from_spec(f"{arch}/quickgelu_run")) == {"QuickGELU"}
    assert activations(OpenCLIPEncoder.from_spec(f"{arch}/gelu_run")) == {"GELU"}
    assert not [w for w in recwarn if "QuickGELU mismatch" in str(w.message)]


def test_open_clip_local_dir_spec_loads_config_and_weights(tmp_path, photo):
    import json

    from safetensors.torch import save_file

    arch = register_tiny_open_clip(tmp_path / "configs")
    reference = OpenCLIPEncoder.from_spec(f"{arch}/none")
    folder = tmp_path / "my-clip"
    folder.mkdir()
    config = json.loads((tmp_path / "configs" / f"{arch}.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    enc = load_backend("encoders", f"open_clip:local-dir:{folder}", "cpu")
    assert enc.name == f"open_clip:local-dir:{folder}"
    assert np.allclose(enc.embed([photo]), reference.embed([photo]), atol=1e-5)
    guard = load_backend("guards", f"clip-zeroshot:open_clip:local-dir:{folder}")  # text tower + tokenizer too
    verdict, = guard.classify([photo], [None], load_policy())
    assert verdict.label in ("safe", "unsafe") and '"gap"' in verdict.raw


def test_hf_clip_tiny_from_pretrained(tmp_path, photo):
    path = build_tiny_hf_clip(tmp_path / "clip")
    enc = load_backend("encoders", f"hf-clip:{path}", "cpu")
    assert isinstance(enc, HFCLIPEncoder) and enc.size == (32, 32)
    emb = enc.embed([photo, photo, photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)])
    assert emb.shape == (3, 16)
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(emb[0] @ emb[2]) < 0.9999
    with pytest.raises(OSError):
        build_backend("encoders", f"hf-clip:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="hf-clip needs <hub id or local path> after 'hf-clip:'"):
        build_backend("encoders", "hf-clip:")


@pytest.mark.slow
def test_lpips_real_weights_rank_identical_below_blur(photo):
    """Needs torchvision's AlexNet weights (downloaded on first use)."""
    from PIL import ImageFilter

    enc = build_backend("encoders", "lpips:alex")
    assert not enc.pnet_rand
    blurred = _arr(photo.filter(ImageFilter.GaussianBlur(2)))
    same, blur = enc.distance_maps([_arr(photo)] * 2, [_arr(photo), blurred])
    assert same.mean() < 1e-6 < blur.mean()
