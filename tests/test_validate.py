"""Pair validation: calibration on real photos, bad input, encoders, judge flip, best-of-K, CLI."""

import io
import json
import logging

import numpy as np
import pytest
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageFilter, ImageOps

from benchmarks.calibration import EXPECTED, calibration_pairs, measure, summarize
from safetypairs import schema as S
from safetypairs.registry import REGISTRY
from safetypairs.runner import read_rows
from safetypairs.validate import (
    REJECT_REASONS,
    ValidateConfig,
    run_validate,
    select_best,
    validate_pairs,
)

CANDIDATE_FEATURES = Features({S.IMAGE: ImageFeature(), S.EDITED_IMAGE: ImageFeature()})


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from safetypairs.sources import demo_photo

    return demo_photo("chelsea").resize((160, 120))


def paste(image: Image.Image, colour=(20, 200, 40), box=(100, 20, 140, 60)) -> Image.Image:
    out = image.copy()
    out.paste(Image.new("RGB", (box[2] - box[0], box[3] - box[1]), colour), box[:2])
    return out


def cell(image: Image.Image, fmt: str = "PNG", **save) -> dict:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return {"bytes": buf.getvalue(), "path": None}


def candidates(originals: list, edited: list, **columns) -> Dataset:
    data = {S.IMAGE: originals, S.EDITED_IMAGE: edited, **columns}
    extra = {k: Value("string") for k in columns}
    return Dataset.from_dict(data, features=Features({**CANDIDATE_FEATURES, **extra}))


def test_calibration_on_real_photos(capsys):
    """Local edits accepted, global changes rejected as not local / background changed, identical = no_change."""
    rows = measure(calibration_pairs())
    table = summarize(rows)
    with capsys.disabled():
        print("\nvalidation calibration (min..max over photos; python -m benchmarks.calibration)\n" + table)
    wrong = [(r["photo"], r["case"], r["decision"]) for r in rows if not r["ok"]]
    assert not wrong, table
    assert {r["case"] for r in rows} == set(EXPECTED)
    local = [r for r in rows if EXPECTED[r["case"]] == ("accept",)]
    assert min(r[S.SSIM_OUTSIDE] for r in local) > ValidateConfig().min_ssim_outside
    assert min(r[S.PSNR_OUTSIDE] for r in local) > ValidateConfig().min_psnr_outside


def test_pair_schema_columns_and_mask(photo):
    pairs = Dataset.from_dict(
        {S.UNSAFE_IMAGE: [photo, photo], S.SAFE_IMAGE: [paste(photo), photo]},
        features=Features({S.UNSAFE_IMAGE: ImageFeature(), S.SAFE_IMAGE: ImageFeature()}),
    )
    config = ValidateConfig(original_column=S.UNSAFE_IMAGE, edited_column=S.SAFE_IMAGE)
    out, result = run_validate(pairs, config)
    assert result.rows_in == result.rows_out == 2 and result.statuses == {"ok": 2}
    assert set(S.VALIDATION_FEATURES) <= set(out.column_names)
    good, same = out[0], out[1]
    assert good[S.ACCEPTED] and good[S.REJECT_REASON] is None and good[S.VALIDATE_STATUS] == "ok"
    assert good[S.METRICS_RAN] == ["change_mask", "ssim", "psnr"]
    assert good[S.EDIT_MASK].size == photo.size and good[S.EDIT_MASK].mode == "L"
    assert good[S.CHANGE_BBOX] == [100, 20, 140, 60]
    assert good[S.CHANGED_FRACTION] == pytest.approx(40 * 40 / (160 * 120), rel=0.01)
    assert good[S.SSIM_OUTSIDE] == pytest.approx(1.0) and good[S.PSNR_OUTSIDE] == 100.0
    assert good[S.COLOR_CHANGE_INSIDE] > 20
    assert not same[S.ACCEPTED] and same[S.REJECT_REASON] == "no_change" and same[S.CHANGE_BBOX] == []


def test_edit_failed_rows_never_crash(photo):
    data = candidates([photo, photo, photo], [paste(photo), None, paste(photo)],
                      edit_status=["error", "ok", "ok"], edit_error=["editor blocked output", None, None])
    out = validate_pairs(data)
    assert out[S.VALIDATE_STATUS] == ["edit_failed", "edit_failed", "ok"]
    assert out[S.REJECT_REASON] == ["edit_failed", "edit_failed", None]
    assert out[S.VALIDATE_ERROR][0] == "editor blocked output"  # the edit stage's own error, as it is
    assert out[S.VALIDATE_ERROR][1] == "row #1 of its batch: no edited image"
    assert out[S.ACCEPTED] == [False, False, True] and out[S.METRICS_RAN][0] == []


def test_bad_input_gets_clear_statuses(photo):
    tiny = photo.resize((20, 16))
    data = candidates(
        [cell(photo), {"bytes": b"\x89PNG not really", "path": None}, cell(photo), cell(tiny)],
        [cell(paste(photo)), cell(photo), cell(photo.resize((150, 120))), cell(paste(tiny, box=(2, 2, 6, 6)))],
    )
    out = validate_pairs(data)
    assert out[S.VALIDATE_STATUS] == ["ok", "unreadable", "size_mismatch", "too_small"]
    assert out[S.VALIDATE_ERROR][1].startswith("row #1 of its batch: image: not an image")
    assert "\\x89PNG" in out[S.VALIDATE_ERROR][1] and "BytesIO" not in out[S.VALIDATE_ERROR][1]
    assert "(160, 120)" in out[S.VALIDATE_ERROR][2] and "min_side=32" in out[S.VALIDATE_ERROR][3]
    assert set(out[S.REJECT_REASON][1:]) <= set(REJECT_REASONS)
    resized = validate_pairs(data.select([2]), size_mismatch="resize")
    assert resized[S.VALIDATE_STATUS] == ["ok"] and resized[S.VALIDATE_RESIZED] == [True]
    assert resized[S.REJECT_REASON] != ["size_mismatch"]


def _mode(image: Image.Image, mode: str) -> dict:
    if mode == "CMYK":
        return cell(image.convert("CMYK"), "JPEG", quality=98)
    if mode == "I;16":
        arr = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        sixteen = Image.fromarray(arr)
        assert sixteen.mode == "I;16"
        return cell(sixteen)
    if mode == "RGBA":
        rgba = image.convert("RGBA")
        rgba.putalpha(255)
        return cell(rgba)
    if mode == "P":  # fixed web palette without dithering, so the edit stays local after quantisation
        return cell(image.convert("P", dither=Image.Dither.NONE))
    return cell(image.convert(mode))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P"])
def test_image_modes_are_read_as_rgb(photo, mode):
    edit = paste(photo, colour=(128, 128, 128))  # inside the photo's value range (see the 16-bit test below)
    out = validate_pairs(candidates([_mode(photo, mode)] * 2, [_mode(edit, mode), _mode(photo, mode)]))
    assert out[S.VALIDATE_STATUS] == ["ok", "ok"]
    assert out[S.REJECT_REASON] == [None, "no_change"], out[S.VALIDATE_ERROR]
    assert out[S.CHANGE_BBOX][0] == [100, 20, 140, 60]


def test_16bit_edit_outside_value_range_stays_local(photo):
    edit = paste(photo, colour=(255, 255, 255))
    out = validate_pairs(candidates([_mode(photo, "I;16")], [_mode(edit, "I;16")]))
    assert out[S.REJECT_REASON] == [None]


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    original = cell(photo, "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(original["bytes"])))
    assert upright.size == (120, 160)
    out = validate_pairs(candidates([original, original], [cell(upright), cell(paste(upright, box=(10, 10, 50, 50)))]))
    assert out[S.VALIDATE_STATUS] == ["ok", "ok"]
    assert out[S.REJECT_REASON] == ["no_change", None]


def test_large_images_measured_downscaled_mask_full_size(photo):
    big = photo.resize((1200, 900))
    edit = paste(big, box=(600, 300, 900, 600))
    out = validate_pairs(candidates([big], [edit]), max_side=400)[0]
    assert out[S.ACCEPTED] and out[S.EDIT_MASK].size == (1200, 900)
    assert out[S.CHANGE_BBOX] == pytest.approx([600, 300, 900, 600], abs=4)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_models import register_tiny_open_clip

    return f"open_clip:{register_tiny_open_clip(tmp_path_factory.mktemp('clip'))}/none"


def test_lpips_and_clip_run_on_the_rank_device(photo, tiny_clip):
    data = candidates([photo] * 2, [paste(photo), photo])
    out = validate_pairs(data, lpips="lpips:alex,pnet_rand=true", clip=tiny_clip, device="cpu")
    good, same = out[0], out[1]
    assert good[S.METRICS_RAN] == ["change_mask", "ssim", "psnr", "lpips:alex,pnet_rand", tiny_clip]
    assert good[S.LPIPS_INSIDE] > good[S.LPIPS_OUTSIDE] >= 0
    assert good[S.CLIP_OUTSIDE] == pytest.approx(1.0, abs=1e-4)  # edited region blanked in both
    assert same[S.LPIPS_OUTSIDE] == pytest.approx(0.0, abs=1e-6) and same[S.LPIPS_INSIDE] is None
    strict = validate_pairs(data.select([0]), lpips="lpips:alex,pnet_rand=true", max_lpips_outside=-0.0)
    assert strict[S.REJECT_REASON] == ["background_changed" if strict[S.LPIPS_OUTSIDE][0] > 0 else None]


def test_unavailable_encoder_falls_back_to_ssim_psnr(photo, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="safetypairs.validate_models"):
        out = validate_pairs(candidates([photo], [paste(photo)]), clip=f"hf-clip:{tmp_path / 'missing'}", device="cpu")
    assert out[S.ACCEPTED] == [True] and out[S.CLIP_OUTSIDE] == [None]
    assert out[S.METRICS_RAN] == [["change_mask", "ssim", "psnr"]]
    assert "unavailable" in caplog.text


class RedJudge:
    """Test judge: unsafe when >= 50 pure-red pixels, unknown when >= 50 pure-blue ones."""

    calls = 0

    @classmethod
    def from_spec(cls, arg, device="cpu", **_):
        return cls()

    def classify(self, images, categories, policy):
        from safetypairs.backends.base import Verdict

        RedJudge.calls += len(images)
        out = []
        for im in images:
            arr = np.asarray(im)
            red = int(((arr == (255, 0, 0)).all(axis=2)).sum())
            blue = int(((arr == (0, 0, 255)).all(axis=2)).sum())
            label = "unknown" if blue >= 50 else "unsafe" if red >= 50 else "safe"
            out.append(Verdict(label, float(red > 0), f"{red} red px, category {categories[0]}", str(red)))
        return out


def test_judge_flip_decisions(photo, monkeypatch):
    monkeypatch.setitem(REGISTRY["judges"], "red-test", "test_validate:RedJudge")
    unsafe = paste(photo, colour=(255, 0, 0))
    originals = [unsafe, photo, unsafe, unsafe, unsafe]
    blurred = photo.filter(ImageFilter.GaussianBlur(2))
    edited = [paste(photo), paste(photo), paste(unsafe, box=(10, 10, 40, 40)), paste(photo, (0, 0, 255)), blurred]
    data = candidates(originals, edited, category=["O1"] * 5)
    RedJudge.calls = 0
    out = validate_pairs(data, judge="red-test")
    assert out[S.REJECT_REASON] == [None, "original_not_unsafe", "still_unsafe", "judge_unknown", "background_changed"]
    assert out[S.ACCEPTED] == [True, False, False, False, False]
    assert out[S.JUDGE][:4] == ["red-test"] * 4 and out[S.JUDGE][4] is None
    assert RedJudge.calls == 8  # the blurred row was rejected by the pixels and not judged
    raw = json.loads(out[S.JUDGE_ORIGINAL_RAW][0])
    assert raw["label"] == "unsafe" and raw["rationale"].endswith("category O1")
    assert out[S.METRICS_RAN][0][-1] == "judge:red-test"
    RedJudge.calls = 0
    validate_pairs(data, judge="red-test", judge_all_rows=True)
    assert RedJudge.calls == 10


def test_real_ocr_lexicon_judge_flips_replaced_text(photo):
    from benchmarks.calibration import _replace_text

    captioned, replaced = _replace_text(photo.resize((480, 360)))
    out = validate_pairs(candidates([captioned, captioned], [replaced, paste(captioned, box=(300, 40, 380, 120))]),
                         judge="ocr-lexicon")
    assert out[S.JUDGE_ORIGINAL] == ["unsafe", "unsafe"]
    assert out[S.JUDGE_EDITED] == ["safe", "unsafe"]
    assert out[S.REJECT_REASON] == [None, "still_unsafe"]
    assert "worthless" in json.loads(out[S.JUDGE_ORIGINAL_RAW][0])["rationale"]


def test_select_best_keeps_best_preserved_accepted_candidate():
    data = Dataset.from_dict({
        S.SOURCE_ID: ["a", "a", "a", "b", "b", "c"],
        S.ACCEPTED: [True, True, False, True, True, False],
        S.SSIM_OUTSIDE: [0.95, 0.99, 1.0, 0.97, 0.97, 1.0],
        S.PSNR_OUTSIDE: [40.0, 45.0, 100.0, 50.0, 60.0, 100.0],
        S.LPIPS_OUTSIDE: [None, None, None, None, None, None],
    }, features=Features({S.SOURCE_ID: Value("string"), S.ACCEPTED: Value("bool"), S.SSIM_OUTSIDE: Value("float32"),
                          S.PSNR_OUTSIDE: Value("float32"), S.LPIPS_OUTSIDE: Value("float32")}))
    best = select_best(data)
    assert best[S.SOURCE_ID] == ["a", "b"] and best[S.SSIM_OUTSIDE] == pytest.approx([0.99, 0.97])
    assert best[S.PSNR_OUTSIDE] == [45.0, 60.0]
    with_lpips = data.map(lambda r, i: {S.LPIPS_OUTSIDE: [0.1, 0.3, 0.0, 0.2, 0.2, 0.0][i]}, with_indices=True)
    assert select_best(with_lpips)[S.PSNR_OUTSIDE] == [40.0, 60.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"size_mismatch": "crop"}, "size_mismatch must be one of"),
    ({"judge": "ocr-lexicom"}, "Did you mean 'ocr-lexicon'"),
    ({"lpips": "open_clip:ViT-B-32/openai"}, "lpips must be an"),
    ({"lpips": "lpips:resnet"}, "allowed: alex, vgg, squeeze"),
    ({"clip": "lpips:alex"}, "clip must be an open_clip or hf-clip spec"),
    ({"min_changed_fraction": 0.5, "max_changed_fraction": 0.4}, "min_changed_fraction"),
    ({"min_side": 4}, "min_side"),
    ({"policy": "no-such-policy"}, "no-such-policy"),
    ({"edited_column": S.IMAGE}, "must differ"),
])
def test_config_is_checked_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ValidateConfig(**kwargs)


def test_missing_columns_raise(photo):
    with pytest.raises(ValueError, match="needs column"):
        run_validate(Dataset.from_dict({"x": [1]}), ValidateConfig())


def test_cli_validate_roundtrip(photo, tmp_path, capsys):
    from safetypairs.cli import main

    candidates([photo, photo], [paste(photo), photo]).save_to_disk(str(tmp_path / "in"))
    assert main(["-q", "validate", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    assert "decision  accepted=1, no_change=1" in capsys.readouterr().out
    assert read_rows(tmp_path / "out")[S.ACCEPTED] == [True, False]
    assert main(["-q", "validate", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    assert "0 computed, 1 reused" in capsys.readouterr().out  # the same finished run: nothing recomputed
    assert main(["-q", "validate", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--judge", "ocr-lexicon"]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert main(["-q", "validate", str(tmp_path / "in"), "--out", str(tmp_path / "in" / "sub")]) == 2
    assert "is the input" in capsys.readouterr().err


if __name__ == "__main__":
    print(summarize(measure(calibration_pairs())))


def test_validate_shards_and_resumes_like_one_process(photo, tmp_path):
    """SIGKILL after the first chunk + restart == uninterrupted == another chunk size == 2 processes."""
    from slow_backends import check_sharding_and_resume

    colours = [(20, 200, 40), (200, 30, 30), (30, 30, 200), (240, 240, 20)]
    originals = [photo.rotate(15 * i) for i in range(8)]
    edits = [paste(im, colours[i % 4], (20 + 8 * i, 10, 60 + 8 * i, 50)) for i, im in enumerate(originals)]
    candidates(originals, edits, category=["O1"] * 8).save_to_disk(str(tmp_path / "in"))

    def args(out, chunk_size):
        return ["validate", str(tmp_path / "in"), "--out", str(out), "--judge", "slow", "--device", "cpu",
                "--chunk-size", str(chunk_size), "--batch-size", "2"]

    check_sharding_and_resume(args, tmp_path, lambda out: read_rows(out).data.table)


class GreenAllergicJudge(RedJudge):
    """`RedJudge` that raises on an image with a green patch (a judge crash on one input)."""

    @classmethod
    def from_spec(cls, arg, device="cpu", **_):
        return cls()

    def classify(self, images, categories, policy):
        if any(((np.asarray(im) == (20, 200, 40)).all(axis=2)).sum() >= 50 for im in images):
            raise RuntimeError("judge crashed on a green patch")
        return super().classify(images, categories, policy)


def test_a_judge_that_raises_marks_only_its_row(photo, isolated_registry):
    isolated_registry.register("judges", "green-allergic", f"{__name__}:GreenAllergicJudge")
    unsafe = paste(photo, colour=(255, 0, 0))
    data = candidates([unsafe, unsafe, unsafe], [paste(photo, (0, 0, 0)), paste(photo), paste(photo, (0, 0, 0))],
                      category=["O1"] * 3, source_id=["a", "b", "c"])
    out = validate_pairs(data, judge="green-allergic")
    assert out[S.VALIDATE_STATUS] == ["ok", "judge_error", "ok"]
    assert out[S.REJECT_REASON] == [None, "judge_error", None] and out[S.ACCEPTED] == [True, False, True]
    assert out[S.VALIDATE_ERROR][1] == ("row 'b': judge green-allergic failed: "
                                        "RuntimeError: judge crashed on a green patch")
    assert out[S.JUDGE_EDITED] == ["safe", None, "safe"] and out[S.CHANGED_FRACTION][1] > 0  # pixels kept
    assert "judge_error" in REJECT_REASONS and not any("judge" in m for m in out[S.METRICS_RAN][1])
