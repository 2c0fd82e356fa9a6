"""Pair validation: calibration on real photos, bad input, encoders, judge flip, best-of-K, CLI."""

import io
import json
import logging

import numpy as np
import pytest
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageFilter, ImageOps

from benchmarks.calibration import calibration_pairs, measure, summarize
from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.validate.calibrate import EXPECTED, LOCAL
from safetypairs.engine.datafiles import read_rows
from safetypairs.validate.thresholds import LATENT_DIFFUSION, PIXEL_EXACT, PRESETS
from safetypairs.validate.decision import select_best
from safetypairs.validate.stage import ValidateConfig, run_validate, validate_pairs
from safetypairs.validate.thresholds import thresholds_used

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
    assert min(r[S.SSIM_OUTSIDE] for r in local) > PRESETS[PIXEL_EXACT].min_ssim_outside
    assert min(r[S.PSNR_OUTSIDE] for r in local) > PRESETS[PIXEL_EXACT].min_psnr_outside


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


def test_rows_the_edit_stage_stopped_keep_its_status_as_their_fate(photo):
    data = candidates([photo, photo, photo], [paste(photo), None, paste(photo)],
                      edit_status=["edit_error", "ok", "ok"], edit_error=["editor blocked output", None, None])
    out = validate_pairs(data)
    assert out[S.VALIDATE_STATUS] == ["not_edited", "not_edited", "ok"]
    assert out[S.REJECT_REASON] == ["edit_error", "not_edited", None]  # the edit stage's word, or ours
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
    assert out[S.REJECT_REASON][1:] == ["unreadable", "size_mismatch", "too_small"]
    assert all(ST.is_known(v) for v in list(out[S.VALIDATE_STATUS]) + list(out[S.REJECT_REASON]))
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
    from tiny_models import build_tiny_open_clip

    return f"open_clip:{build_tiny_open_clip(tmp_path_factory.mktemp('clip'))}"


def test_lpips_and_clip_measure_outside_the_mask(photo, tiny_clip):
    import torch

    from safetypairs.backends.registry import unload_backends

    unload_backends()  # the random LPIPS backbone is drawn at load: from a known torch RNG state
    torch.manual_seed(0)
    data = candidates([photo] * 2, [paste(photo), photo])
    out = validate_pairs(data, lpips="lpips:alex,pnet_rand=true", clip=tiny_clip, device="cpu")
    good, same = out[0], out[1]
    assert good[S.METRICS_RAN] == ["change_mask", "ssim", "psnr", "lpips:alex,pnet_rand", tiny_clip]
    assert good[S.LPIPS_INSIDE] > good[S.LPIPS_OUTSIDE] > 1e-4  # the edit leaks into the receptive fields around it
    assert good[S.CLIP_OUTSIDE] == pytest.approx(1.0, abs=1e-4)  # edited region blanked in both
    assert same[S.LPIPS_OUTSIDE] == pytest.approx(0.0, abs=1e-6) and same[S.LPIPS_INSIDE] is None
    lpips = "lpips:alex,pnet_rand=true"
    strict = validate_pairs(data.select([0]), lpips=lpips, max_lpips_outside=1e-4)[0]
    assert strict[S.REJECT_REASON] == "background_changed" and strict[S.REJECT_DETAIL].startswith("lpips_outside ")
    assert validate_pairs(data.select([0]), lpips=lpips, max_lpips_outside=0.9)[S.REJECT_REASON] == [None]


class _RecordingEncoder:
    """A stand-in encoder that keeps the device it was built for: LPIPS maps of 0.25, equal CLIP embeddings."""

    min_side = 16

    def __init__(self, spec: str, device: str) -> None:
        self.name, self.device = spec, device

    def distance_maps(self, references: list, edits: list) -> list:
        return [np.full(r.shape[:2], 0.25, dtype=np.float32) for r in references]

    def embed(self, images: list) -> np.ndarray:
        return np.tile(np.array([1.0, 0.0], dtype=np.float32), (len(images), 1))


def test_lpips_and_clip_run_on_the_rank_device(photo, monkeypatch):
    """The device the stage picks for a map rank (``auto``: the rank's GPU) is the one the encoders are built on."""
    import torch

    from safetypairs.validate import measurements
    from safetypairs.validate.stage import ValidateTransform

    built = []

    def recording_load(kind: str, spec: str, device: str) -> _RecordingEncoder:
        built.append((kind, spec, device))
        return _RecordingEncoder(spec, device)

    monkeypatch.setattr(measurements, "load_backend", recording_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    batch = {S.IMAGE: [photo], S.EDITED_IMAGE: [paste(photo)]}
    specs = {"lpips": "lpips:alex", "clip": "open_clip:ViT-B-32/none"}
    out = ValidateTransform(ValidateConfig(device="auto", **specs))(batch, rank=3)
    assert built == [("encoders", "lpips:alex", "cuda:1"), ("encoders", "open_clip:ViT-B-32/none", "cuda:1")]
    assert out[S.LPIPS_OUTSIDE] == [0.25] and out[S.CLIP_OUTSIDE] == [1.0]  # the stand-ins' numbers, measured there
    built.clear()
    ValidateTransform(ValidateConfig(device="cpu", **specs))(batch, rank=3)  # an explicit device is used as given
    assert [device for *_, device in built] == ["cpu", "cpu"]


def test_unavailable_encoder_falls_back_to_ssim_psnr(photo, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="safetypairs.validate.models"):
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


def test_judge_flip_decisions(photo, isolated_registry):
    isolated_registry.REGISTRY["judges"]["red-test"] = "test_validate:RedJudge"
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
    # 4 edits and 2 originals (rows 0, 2 and 3 share one): the blurred row was rejected by the pixels, not judged
    assert RedJudge.calls == 6
    raw = json.loads(out[S.JUDGE_ORIGINAL_RAW][0])
    assert raw["label"] == "unsafe" and raw["rationale"].endswith("category O1")
    assert out[S.METRICS_RAN][0][-1] == "judge:red-test"
    RedJudge.calls = 0
    validate_pairs(data, judge="red-test", judge_all_rows=True)
    assert RedJudge.calls == 5 + 2


def test_real_ocr_lexicon_judge_flips_replaced_text(photo):
    from safetypairs.validate.calibrate import replace_text

    captioned, replaced = replace_text(photo.resize((480, 360)))
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
    ({"judge": "shieldgemma2:no/such-model,scope=everything"}, "shieldgemma2 option scope must be one of all, category, got 'everything'"),  # before any load
    ({"judge": "clip-zeroshot:open_clip:ViT-B-32/none,thresh=0"}, "allowed: threshold"),
    ({"lpips": "open_clip:ViT-B-32/openai"}, "lpips must be an"),
    ({"lpips": "lpips:resnet"}, "allowed: alex, vgg, squeeze"),
    ({"clip": "lpips:alex"}, "clip must be an open_clip or hf-clip spec"),
    ({"min_element_fraction": 1.5}, r"threshold value\(s\): min_element_fraction=1.5 \(allowed: \[0, 1\)\)"),
    ({"max_changed_fraction": 0.0}, r"max_changed_fraction=0.0 \(allowed: \(0, 1\]\)"),
    ({"max_lpips_outside": float("nan")}, r"max_lpips_outside=nan \(allowed: >= 0 or None\)"),
    ({"reference": "vae"}, "reference must be one of"),
    ({"thresholds": "latent"}, "thresholds must be one of pixel-exact, latent-diffusion"),
    ({"control_column": S.IMAGE}, "must differ"),
    ({"min_side": 4}, r"ValidateConfig value\(s\): min_side=4 \(allowed: >= 8\)"),
    ({"num_proc": 0}, r"num_proc=0 \(allowed: >= 1 or None\)"),
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




def test_cli_validate_thresholds_and_composite(photo, tmp_path, capsys):
    from safetypairs.cli import main
    from safetypairs.validate.thresholds import Thresholds, write_thresholds

    candidates([photo, photo], [paste(photo), photo]).save_to_disk(str(tmp_path / "in"))
    strict = write_thresholds(tmp_path / "t.yaml", Thresholds(max_change_spread=0.01))
    argv = ["-q", "validate", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--composite",
            "--thresholds", str(strict)]
    assert main(argv) == 0
    out = read_rows(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["thresholds"]["thresholds"] == str(strict)
    assert out[S.VALIDATE_THRESHOLDS] == [str(strict)] * 2
    assert out[S.REJECT_REASON] == ["not_local", "no_change"]  # the paste touches 4 of 64 cells > 0.01
    assert all("composite" in ran for ran in out[S.METRICS_RAN])
    assert main(["-q", "validate", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--thresholds", "exact"]) == 2
    assert "thresholds must be one of" in capsys.readouterr().err

# --- editors that re-render every pixel: control / VAE reference, presets, compositing ----------

REQUIRED_GLOBAL = ("brightness", "saturation", "translate_3px", "crop_resize")


@pytest.mark.parametrize("fingerprint", ["mild", "strong", "resample"])
def test_fingerprinted_editor_measured_against_its_control(fingerprint):
    """Fingerprint on control and edits: local edits accepted, global changes rejected, identical = no_change."""
    rows = measure(calibration_pairs(("astronaut", "coffee", "rocket"), fingerprint))
    wrong = [(r["photo"], r["case"], r["decision"]) for r in rows
             if (r["case"] in LOCAL or r["case"] in REQUIRED_GLOBAL or r["case"] == "identical") and not r["ok"]]
    assert not wrong, summarize(rows)
    assert all(r[S.NOISE_FLOOR_PSNR] < 40 for r in rows)  # the editor's own fingerprint, recorded


def test_fingerprint_against_the_original_rejects_local_edits():
    """Why the control matters: the same edits measured against the original fail the pixel-exact thresholds."""
    rows = measure(calibration_pairs(("astronaut", "coffee"), "mild"), ValidateConfig(reference="original"))
    local = [r for r in rows if r["case"] in LOCAL]
    assert sum(r["decision"] != "accept" for r in local) >= len(local) // 2, summarize(rows)
    assert all(r[S.NOISE_FLOOR_PSNR] is None for r in rows)


def test_thin_object_removed_is_a_change_not_no_change():
    from safetypairs.validate.calibrate import remove_thin_object
    from safetypairs.sources import demo_photo

    photo = demo_photo("rocket").resize((384, 384))
    original, edited = remove_thin_object(photo)
    out = validate_pairs(candidates([original, original], [edited, original.copy()]))
    assert out[S.REJECT_REASON] == [None, "no_change"]
    assert 0 < out[S.CHANGED_FRACTION][0] < 0.005 and out[S.CHANGE_ELEMENT][0] > PRESETS[PIXEL_EXACT].min_element_fraction


def _with_control(originals, edited, controls, editor=None) -> Dataset:
    columns = {S.IMAGE: originals, S.EDITED_IMAGE: edited, S.CONTROL_IMAGE: controls}
    features = {k: ImageFeature() for k in columns}
    if editor is not None:
        columns[S.EDITOR], features[S.EDITOR] = [editor] * len(originals), Value("string")
    return Dataset.from_dict(columns, features=Features(features))


def test_composite_keeps_the_original_outside_the_feathered_mask(photo):
    from benchmarks.calibration import FINGERPRINTS
    from safetypairs.validate.change import feather

    fp = FINGERPRINTS["mild"]
    edits = [paste(photo), photo.filter(ImageFilter.GaussianBlur(2)), photo.copy()]
    data = _with_control([photo] * 3, [fp(e) for e in edits], [fp(photo)] * 3)
    plain = validate_pairs(data)
    comp = validate_pairs(data, composite=True, feather_px=4)
    assert plain[S.REJECT_REASON] == comp[S.REJECT_REASON] == [None, "background_changed", "no_change"]
    for name in (S.CHANGED_FRACTION, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE, S.CHANGE_BBOX):
        assert plain[name] == comp[name]
    original = np.asarray(photo)
    for i in range(3):
        mask = np.asarray(comp[S.EDIT_MASK][i]) > 0
        region = cv2_dilate(mask, 5)  # the validate margin: dilate_min_px = 5 at this size
        soft = feather(region, 4) > 0
        for column in (S.EDITED_IMAGE, S.CONTROL_IMAGE):
            out = np.asarray(comp[column][i])
            assert np.array_equal(out[~soft], original[~soft]), (i, column)
        assert "composite" in comp[S.METRICS_RAN][i]
    inside = np.asarray(plain[S.EDIT_MASK][0]) > 0
    assert np.array_equal(np.asarray(comp[S.EDITED_IMAGE][0])[inside], np.asarray(fp(edits[0]))[inside])
    assert not np.array_equal(np.asarray(comp[S.EDITED_IMAGE][1]), np.asarray(fp(edits[1])))


def cv2_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), disk).astype(bool)


def test_preset_follows_the_editor_and_is_reported(photo):
    data = candidates([photo] * 2, [paste(photo), photo], **{S.EDITOR: ["ocr-inpaint", "diffusers:/nowhere"]})
    out = validate_pairs(data, reference="control")
    assert out[S.VALIDATE_THRESHOLDS] == [PIXEL_EXACT, LATENT_DIFFUSION]
    used = thresholds_used(data, ValidateConfig())
    assert used["thresholds"] == "auto" and used["composite"] is False
    assert used["by_editor"]["diffusers:/nowhere"]["thresholds"] == LATENT_DIFFUSION
    assert used["by_editor"]["ocr-inpaint"]["values"] == PRESETS[PIXEL_EXACT].as_dict()
    fixed = thresholds_used(data, ValidateConfig(thresholds=LATENT_DIFFUSION, min_psnr_outside=20.0))
    assert {v["thresholds"] for v in fixed["by_editor"].values()} == {f"{LATENT_DIFFUSION}+overrides"}
    assert fixed["by_editor"]["ocr-inpaint"]["values"]["min_psnr_outside"] == 20.0


def test_lpips_outside_compares_with_the_control(photo):
    from benchmarks.calibration import FINGERPRINTS

    fp = FINGERPRINTS["strong"]
    data = _with_control([photo], [fp(paste(photo))], [fp(photo)])
    spec = "lpips:alex,pnet_rand=true"
    control = validate_pairs(data, lpips=spec, device="cpu")[0]
    plain = validate_pairs(data, lpips=spec, device="cpu", reference="original")[0]
    assert control[S.VALIDATE_REFERENCE] == "control" and plain[S.VALIDATE_REFERENCE] == "original"
    assert control[S.LPIPS_OUTSIDE] < plain[S.LPIPS_OUTSIDE]


@pytest.fixture(scope="module")
def tiny_ip2p(tmp_path_factory):
    from tiny_models import build_tiny_ip2p

    return build_tiny_ip2p(tmp_path_factory.mktemp("ip2p"))


def test_tiny_diffusers_vae_reference_end_to_end(tiny_ip2p):
    """Edits rendered through a tiny pipeline's VAE: the control and the VAE round trip of the original give the
    same decisions; local edits accepted, shift and crop rejected, identical = no_change.

    The tiny VAE has random weights (noise floor ~9 dB: it does not preserve the image) and squashes brightness
    and saturation changes into small ones, so those two are left to the fingerprint tests above.
    """
    from safetypairs.backends.diffusion import DiffusersEditor
    from safetypairs.backends.registry import from_spec_arguments
    from safetypairs.validate.calibrate import known_edits
    from safetypairs.sources import demo_photo

    spec = f"diffusers:{tiny_ip2p},resolution=0"
    model, options = from_spec_arguments("editors", spec)
    roundtrip = DiffusersEditor.roundtrip_reference(model, "cpu", **options)
    wanted = ("paste_object", "inpaint_region", "replace_text", "remove_thin_object", "translate_3px",
              "crop_resize", "identical")
    cases = [c for c in known_edits(demo_photo("astronaut").resize((256, 256))) if c[0] in wanted]
    originals = [o for _, o, _ in cases]
    edited = roundtrip([e for _, _, e in cases])
    controls = roundtrip(originals)
    with_control = validate_pairs(_with_control(originals, edited, controls, editor=spec))
    without = validate_pairs(_with_control(originals, edited, [None] * len(cases), editor=spec))
    assert set(with_control[S.VALIDATE_REFERENCE]) == {"control"}
    assert set(without[S.VALIDATE_REFERENCE]) == {"vae_roundtrip"}
    assert set(without[S.VALIDATE_THRESHOLDS]) == {LATENT_DIFFUSION}
    assert with_control[S.REJECT_REASON] == without[S.REJECT_REASON]
    assert with_control[S.NOISE_FLOOR_PSNR] == pytest.approx(without[S.NOISE_FLOOR_PSNR])
    decisions = dict(zip([c for c, _, _ in cases], with_control[S.REJECT_REASON]))
    assert decisions == {"paste_object": None, "inpaint_region": None, "replace_text": None,
                         "remove_thin_object": None, "translate_3px": "not_local", "crop_resize": "not_local",
                         "identical": "no_change"}


def test_generate_with_control_through_tiny_pipeline(tiny_ip2p):
    """The real diffusers editor path: candidates with a control are measured against it, and an edit with the
    no-op instruction is indistinguishable from its control (no_change)."""
    from safetypairs.edit import EditConfig, run_edit
    from safetypairs.instructions import NOOP_INSTRUCTION
    from safetypairs.sources import demo_photo

    photo = demo_photo("chelsea").resize((64, 64))
    rows = Dataset.from_dict({S.SOURCE_ID: ["a", "b"], S.IMAGE: [photo, photo],
                              S.INSTRUCTION: ["make the cat blue", NOOP_INSTRUCTION]},
                             features=Features({S.SOURCE_ID: Value("string"), S.IMAGE: ImageFeature(),
                                                S.INSTRUCTION: Value("string")}))
    editor = f"diffusers:{tiny_ip2p},steps=2,resolution=64"
    edited, _ = run_edit(rows, EditConfig(editor=editor, control=True, device="cpu"))
    out = validate_pairs(edited)
    assert out[S.VALIDATE_REFERENCE] == ["control", "control"]
    assert out[S.VALIDATE_THRESHOLDS] == [LATENT_DIFFUSION] * 2
    assert all(v is not None and v < 100 for v in out[S.NOISE_FLOOR_PSNR])
    assert out[S.REJECT_REASON][1] == "no_change" and out[S.CHANGED_FRACTION][1] == 0.0

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
    assert ST.is_known("judge_error") and not any("judge" in m for m in out[S.METRICS_RAN][1])


def test_released_pairs_are_recognised_and_no_judge_is_said(photo, caplog):
    from safetypairs.validate.stage import _warned_without_judge

    _warned_without_judge.cache_clear()
    pairs = Dataset.from_dict({S.UNSAFE_IMAGE: [photo] * 2, S.SAFE_IMAGE: [paste(photo), photo]},
                              features=Features({S.UNSAFE_IMAGE: ImageFeature(), S.SAFE_IMAGE: ImageFeature()}))
    with caplog.at_level(logging.WARNING):
        out = validate_pairs(pairs)
        validate_pairs(pairs)
    assert out[S.REJECT_REASON] == [None, "no_change"] and out[S.LABEL_FLIP_CHECKED] == [False, False]
    assert caplog.text.count("nothing checks that the edit flips the label") == 1  # once per process


def test_rows_the_instruct_stage_stopped_keep_its_status_as_their_fate(photo):
    """The same word in the funnel (instruct statuses) and the card (reject reasons): no renaming on the way."""
    rows = candidates([cell(photo)] * 3, [None, None, cell(paste(photo))],
                      **{S.INSTRUCT_STATUS: ["no_violation_found", ST.NOT_UNSAFE, "ok"],
                         S.EDIT_STATUS: ["not_instructed", "not_instructed", "ok"]})
    out = run_validate(rows, ValidateConfig(judge=None))[0]
    assert out[S.VALIDATE_STATUS] == ["not_edited", "not_edited", "ok"]
    assert out[S.REJECT_REASON] == ["no_violation_found", ST.NOT_UNSAFE, None]
    assert all(ST.is_known(v) for v in out[S.REJECT_REASON])


def test_a_rejection_names_the_measured_value_and_the_limit(photo):
    """`background_changed` says which metric missed by how much; each row keeps the limits it was decided with."""
    blurred = photo.filter(ImageFilter.GaussianBlur(2))
    out = validate_pairs(candidates([photo, photo], [blurred, paste(photo)]))
    assert out[S.REJECT_REASON] == ["background_changed", None]
    limits = json.loads(out[S.VALIDATE_LIMITS][0])
    assert limits == PRESETS[PIXEL_EXACT].as_dict() and out[S.VALIDATE_THRESHOLDS][0] == PIXEL_EXACT
    detail = out[S.REJECT_DETAIL][0]
    ssim, psnr = out[S.SSIM_OUTSIDE][0], out[S.PSNR_OUTSIDE][0]
    expected = []
    if ssim < limits["min_ssim_outside"]:
        expected.append(f"ssim_outside {ssim:.4g} < {limits['min_ssim_outside']:.4g}")
    if psnr < limits["min_psnr_outside"]:
        expected.append(f"psnr_outside {psnr:.4g} < {limits['min_psnr_outside']:.4g}")
    assert expected and detail == "; ".join(expected)
    assert out[S.REJECT_DETAIL][1] is None


def test_a_nan_metric_outside_the_mask_fails_its_limit():
    """A metric that could not be computed must not pass: NaN is below every minimum and above every maximum."""
    from safetypairs.validate.decision import decide_pixels
    from safetypairs.validate.thresholds import Thresholds

    row = {S.CHANGED_FRACTION: 0.01, S.CHANGE_SPREAD: 0.1, S.CHANGE_ELEMENT: 0.01, S.SSIM_OUTSIDE: 0.99,
           S.PSNR_OUTSIDE: 40.0, S.CLIP_OUTSIDE: None, S.LPIPS_OUTSIDE: None}
    limits = Thresholds(max_lpips_outside=0.1, min_clip_outside=0.9)
    assert decide_pixels(limits, row) == (None, None)
    for column in (S.SSIM_OUTSIDE, S.PSNR_OUTSIDE, S.LPIPS_OUTSIDE, S.CLIP_OUTSIDE):
        reason, detail = decide_pixels(limits, {**row, column: float("nan")})
        assert reason == "background_changed" and detail.startswith(f"{column} nan"), column


def test_validate_resolves_categories_as_generate_does(photo):
    """A pairs table made elsewhere names categories LlavaGuard's way ("O1: Hate, ...") or in lower case: each
    resolves to its code (and is written as the code), as at the instruct stage; an unknown one is refused."""
    data = candidates([photo] * 4, [paste(photo)] * 4,
                      category=["O1: Hate, Humiliation, Harassment", "o2", "Weapons or Substance Abuse", "Spam"])
    out = validate_pairs(data)
    assert list(out[S.REJECT_REASON]) == [None, None, None, "unknown_category"]
    assert list(out[S.CATEGORY]) == ["O1", "O2", "O6", "Spam"]


def test_an_original_is_decoded_round_tripped_and_judged_once_for_its_candidates(photo, tiny_ip2p, monkeypatch,
                                                                                   isolated_registry):
    """K = 4 candidates of each of two sources, interleaved and two to a batch (no batch holds two candidates of one
    source): each original is decoded once, round-tripped through the editor's VAE once and judged once, and the
    rows equal those of each candidate validated alone."""
    from safetypairs.backends.diffusion import VAERoundTrip
    from safetypairs.images import image_digest
    from safetypairs.validate import originals as originals_module
    from safetypairs.validate import pair as pair_module

    isolated_registry.REGISTRY["judges"]["red-test"] = "test_validate:RedJudge"
    sources = {"a": paste(photo, colour=(255, 0, 0), box=(10, 10, 30, 30)), "b": photo.rotate(20)}
    order = ["a", "b"] * 4
    edits = [paste(sources[s], colours, (40 + 10 * k, 60, 70 + 10 * k, 90))
             for k, (s, colours) in enumerate(zip(order, [(20, 200, 40), (30, 30, 200)] * 4))]
    data = Dataset.from_dict({S.SOURCE_ID: order, S.IMAGE: [sources[s] for s in order], S.EDITED_IMAGE: edits,
                              S.EDITOR: [f"diffusers:{tiny_ip2p},resolution=0"] * 8, S.CATEGORY: ["O1"] * 8},
                             features=Features({S.SOURCE_ID: Value("string"), **CANDIDATE_FEATURES,
                                                S.EDITOR: Value("string"), S.CATEGORY: Value("string")}))
    decoded, judged, round_tripped = [], [], []
    real_load, real_classify, real_roundtrip = pair_module.load_image, RedJudge.classify, VAERoundTrip.__call__

    def load(cell, max_pixels):
        decoded.append(image_digest(image := real_load(cell, max_pixels)))
        return image

    def classify(self, images, categories, policy):
        judged.extend(image_digest(im) for im in images)
        return real_classify(self, images, categories, policy)

    def roundtrip(self, images, work_sizes=None):
        round_tripped.extend(image_digest(im) for im in images)
        return real_roundtrip(self, images, work_sizes)

    monkeypatch.setattr(pair_module, "load_image", load)
    monkeypatch.setattr(RedJudge, "classify", classify)
    monkeypatch.setattr(VAERoundTrip, "__call__", roundtrip)
    config = ValidateConfig(judge="red-test", judge_all_rows=True, batch_size=2)
    out = run_validate(data, config)[0]
    originals = {image_digest(im) for im in sources.values()}
    assert sorted(d for d in decoded if d in originals) == sorted(originals)  # 1 decode per source, not 4
    assert sorted(d for d in judged if d in originals) == sorted(originals)  # 1 verdict per source, not 4
    assert len(judged) == 2 + 8 and len(decoded) == 2 + 8
    assert sorted(round_tripped) == sorted(originals)  # 1 round trip per source, not 4
    assert out[S.VALIDATE_REFERENCE] == ["vae_roundtrip"] * 8 and out[S.JUDGE_ORIGINAL] == ["unsafe", "safe"] * 4
    columns = [S.REJECT_REASON, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE, S.CHANGED_FRACTION, S.NOISE_FLOOR_PSNR,
               S.JUDGE_ORIGINAL, S.JUDGE_EDITED, S.JUDGE_ORIGINAL_RAW]
    alone = [run_validate(data.select([i]), config)[0] for i in range(8)]
    assert [[row[0] for row in (one[c] for c in columns)] for one in alone] == [
        [out[c][i] for c in columns] for i in range(8)]
    for size in ("DECODED_ORIGINALS", "ROUND_TRIPS", "REFERENCE_LABS", "VERDICTS"):  # caches smaller than a batch
        monkeypatch.setattr(originals_module, size, 1)
    small = run_validate(data, ValidateConfig(judge="red-test", judge_all_rows=True, batch_size=8))[0]
    assert [[small[c][i] for c in columns] for i in range(8)] == [[out[c][i] for c in columns] for i in range(8)]
