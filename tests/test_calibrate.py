"""Per-editor calibration: known edits through a deterministic editor fingerprint, fitted thresholds, round trip."""

import pytest
import yaml

from benchmarks.calibration import FINGERPRINTS
from safetypairs import schema as S
from safetypairs.validate.calibrate import (
    EXPECTED,
    GLOBAL,
    LOCAL,
    CalibrateConfig,
    calibrate,
    known_edits,
    run_calibrate,
)
from safetypairs.validate.thresholds import (
    FORMAT,
    PIXEL_EXACT,
    PRESETS,
    load_thresholds,
    write_thresholds,
)
from safetypairs.validate.stage import ValidateConfig, validate_pairs


class FingerprintEditor:
    """Test editor: returns its input through a deterministic fingerprint of `FINGERPRINTS` (a no-op editor
    that re-renders every pixel, like a latent editor's VAE); counts the images it edited."""

    calls = 0

    def __init__(self, name: str) -> None:
        self.fingerprint = FINGERPRINTS[name]

    @classmethod
    def from_spec(cls, arg, device="cpu", **_):
        return cls(arg or "mild")

    def edit(self, images, instructions, seeds, masks=None):
        FingerprintEditor.calls += len(images)
        return [self.fingerprint(im.convert("RGB")) for im in images]


@pytest.fixture
def fingerprint_editor(isolated_registry):
    """The fingerprint editor registered for one test (the backend cache cleared around it)."""
    isolated_registry.REGISTRY["editors"]["fingerprint-test"] = "test_calibrate:FingerprintEditor"
    return "fingerprint-test"


@pytest.fixture(scope="module")
def photos():
    from safetypairs.sources import demo_photo

    return [demo_photo(name).resize((384, 288)) for name in ("astronaut", "coffee")]


def test_known_edits_cover_every_expected_case(photos):
    cases = known_edits(photos[0])
    assert [c for c, _, _ in cases] == list(EXPECTED)
    for case, original, edited in cases:
        assert original.size == edited.size == photos[0].size
        assert (original.tobytes() == edited.tobytes()) == (case == "identical"), case


@pytest.mark.parametrize("fingerprint", ["mild", "strong", "resample"])
def test_calibration_round_trip(photos, fingerprint, fingerprint_editor, tmp_path):
    """A thresholds file written by calibrate reproduces, through validate, the decisions it was fit on."""
    spec = f"{fingerprint_editor}:{fingerprint}"
    FingerprintEditor.calls = 0
    result = calibrate(photos, CalibrateConfig(editor=spec, device="cpu"))
    assert FingerprintEditor.calls == 2 * len(EXPECTED) * len(photos)  # each case's original and edit
    assert not result.unseparated, result.rows
    assert all(r["ok"] for r in result.rows)
    assert {r["decision"] for r in result.rows if r["case"] in LOCAL} == {"accept"}
    assert {r["decision"] for r in result.rows if r["case"] in GLOBAL} <= {"not_local", "background_changed"}
    fitted = result.thresholds
    assert fitted.mask_delta_e == PRESETS[PIXEL_EXACT].mask_delta_e  # measured with it, so kept
    path = write_thresholds(tmp_path / "t.yaml", fitted, editor=spec)
    loaded = load_thresholds(str(path))
    for name, value in fitted.as_dict().items():
        assert getattr(loaded, name) == (None if value is None else pytest.approx(value, rel=1e-5))
    # validate the same candidates with the file: the same decision for every case
    from safetypairs.validate.calibrate import edited_cases

    data = edited_cases(photos, CalibrateConfig(editor=spec))
    out = validate_pairs(data, ValidateConfig(thresholds=str(path)))
    decisions = ["accept" if ok else reason for ok, reason in zip(out[S.ACCEPTED], out[S.REJECT_REASON])]
    assert decisions == [r["decision"] for r in result.rows]
    assert set(out[S.VALIDATE_REFERENCE]) == {"control"}
    assert set(out[S.VALIDATE_THRESHOLDS]) == {str(path)}


def test_cli_calibrate_writes_a_file_validate_loads(fingerprint_editor, tmp_path, capsys):
    from safetypairs.cli import main

    out = tmp_path / "thresholds.yaml"
    argv = ["-q", "calibrate", "--editor", f"{fingerprint_editor}:mild", "--source", "demo:2", "--n", "2",
            "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{2 * len(EXPECTED)}/{2 * len(EXPECTED)} cases decided as expected" in printed
    data = yaml.safe_load(out.read_text())
    assert data["format"] == FORMAT and data["editor"] == f"{fingerprint_editor}:mild" and data["images"] == 2
    assert data["decisions"]["identical"] == ["no_change"] and data["decisions"]["paste_object"] == ["accept"]
    assert ValidateConfig(thresholds=str(out)).thresholds == str(out)


def test_run_calibrate_on_a_source(fingerprint_editor, tmp_path):
    result = run_calibrate("demo:1", tmp_path / "t.yaml", CalibrateConfig(editor=f"{fingerprint_editor}:resample",
                                                                          device="cpu"), n=1)
    assert len(result.rows) == len(EXPECTED) and all(r["ok"] for r in result.rows)
    assert (tmp_path / "t.yaml").is_file()


@pytest.mark.parametrize("text, match", [
    ("format: other\nthresholds: {}\n", "not a thresholds file"),
    (f"format: {FORMAT}\nthresholds: {{min_psnr: 3}}\n", "unknown threshold"),
    (f"format: {FORMAT}\nthresholds: {{min_ssim_outside: 3}}\n", r"t.yaml: .*min_ssim_outside=3.0 \(allowed: \[-1, 1\]\)"),
])
def test_bad_thresholds_files_are_refused(tmp_path, text, match):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        ValidateConfig(thresholds=str(path))


def test_calibrate_config_is_checked():
    with pytest.raises(ValueError, match="Did you mean 'diffusers'"):
        CalibrateConfig(editor="difusers:x")
    with pytest.raises(ValueError, match="thresholds must be one of"):
        CalibrateConfig(editor="ocr-inpaint", base="exact")
