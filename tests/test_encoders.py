"""Encoder backends: spatial LPIPS, open_clip and hf-clip image embeddings (tiny offline models)."""

import numpy as np
import pytest
from PIL import Image
from tiny_models import build_tiny_hf_clip, register_tiny_open_clip

from safetypairs.backends.encoders import (
    HFCLIPEncoder,
    LPIPSEncoder,
    OpenCLIPEncoder,
    lpips_arguments,
)
from safetypairs.registry import REGISTRY, load_backend


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


def test_lpips_arguments_default_uses_real_weights():
    assert lpips_arguments(None) == ("alex", False)
    assert lpips_arguments("vgg") == ("vgg", False)
    assert lpips_arguments("squeeze,pnet_rand=true") == ("squeeze", True)
    assert lpips_arguments("pnet_rand=1") == ("alex", True)
    with pytest.raises(ValueError, match="allowed: alex, vgg, squeeze"):
        lpips_arguments("resnet")
    with pytest.raises(ValueError, match="allowed: pnet_rand"):
        lpips_arguments("alex,depth=3")


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
    with pytest.raises(ValueError, match="options go in the spec"):
        LPIPSEncoder.from_spec("alex", pnet_rand=True)


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
    reloaded = OpenCLIPEncoder.from_spec(f"{arch}/{checkpoint}")
    assert np.allclose(reloaded.embed([photo]), emb[:1], atol=1e-5)
    with pytest.raises(ValueError, match="needs a model: open_clip:<arch>"):
        OpenCLIPEncoder.from_spec(None)


def test_hf_clip_tiny_from_pretrained(tmp_path, photo):
    path = build_tiny_hf_clip(tmp_path / "clip")
    enc = load_backend("encoders", f"hf-clip:{path}", "cpu")
    assert isinstance(enc, HFCLIPEncoder) and enc.size == (32, 32)
    emb = enc.embed([photo, photo, photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)])
    assert emb.shape == (3, 16)
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(emb[0] @ emb[2]) < 0.9999
    with pytest.raises(OSError):
        HFCLIPEncoder.from_spec(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs a model"):
        HFCLIPEncoder.from_spec("")


@pytest.mark.slow
def test_lpips_real_weights_rank_identical_below_blur(photo):
    """Needs torchvision's AlexNet weights (downloaded on first use)."""
    from PIL import ImageFilter

    enc = LPIPSEncoder.from_spec("alex")
    assert not enc.pnet_rand
    blurred = _arr(photo.filter(ImageFilter.GaussianBlur(2)))
    same, blur = enc.distance_maps([_arr(photo)] * 2, [_arr(photo), blurred])
    assert same.mean() < 1e-6 < blur.mean()
