"""Claim (a): natural-image accuracy beside pair accuracy, with bootstrap CIs of the gap."""

import pytest
from datasets import Dataset

from safetypairs.natural import NATURAL_ROLE, natural_comparison, natural_images
from safetypairs.sources import demo_photo

PRED = "guard_pred"


def _release(pairs_right: int, pairs_wrong: int) -> dict:
    table = {"label": [], "pair_id": [], "role": [], PRED: []}
    for i in range(pairs_right + pairs_wrong):
        edited_pred = "safe" if i < pairs_right else "unsafe"
        for role, label, pred in (("original", "unsafe", "unsafe"), ("edited", "safe", edited_pred),
                                  ("control", "unsafe", "safe")):
            table["label"].append(label)
            table["pair_id"].append(f"p{i}")
            table["role"].append(role)
            table[PRED].append(pred)
    return table


def test_known_gap_between_natural_images_and_pairs():
    natural = {"label": [1, 0] * 10, PRED: ["unsafe", "safe"] * 9 + ["unknown", "unsafe"]}  # 18 of 20 right
    out = natural_comparison(_release(3, 7), natural, {"g": PRED}, n_bootstrap=500, seed=1)["g"]
    assert out["natural_accuracy"]["value"] == pytest.approx(0.9)
    assert out["release_pair_accuracy"]["value"] == pytest.approx(0.3)
    assert out["release_accuracy"]["value"] == pytest.approx(13 / 20)  # controls left out
    assert out["gap_pair_accuracy"]["value"] == pytest.approx(0.6)
    low, high = out["gap_pair_accuracy"]["ci"]
    assert 0 < low < 0.6 < high <= 1.0
    assert out["n_natural"] == 20 and out["n_pairs"] == 10
    again = natural_comparison(_release(3, 7), natural, {"g": PRED}, n_bootstrap=500, seed=1)["g"]
    assert again == out


def test_no_bootstrap_gives_points_without_cis():
    out = natural_comparison(_release(1, 1), {"label": [1], PRED: ["unsafe"]}, {"g": PRED}, n_bootstrap=0)["g"]
    assert out["gap_pair_accuracy"] == {"value": 0.5, "ci": None}


def test_natural_images_shape():
    rows = Dataset.from_dict({"image": [demo_photo("coffee").resize((16, 16))] * 2, "label": [0, 1], "extra": [1, 2]})
    out = natural_images(rows)
    assert out.column_names == ["image", "label", "category", "pair_id", "role"]
    assert out["role"] == [NATURAL_ROLE] * 2 and len(set(out["pair_id"])) == 2
    with pytest.raises(ValueError, match="need columns \\['label'\\]"):
        natural_images(rows.remove_columns("label"))


def test_evaluate_cli_reports_natural_beside_pairs(tmp_path, capsys):
    from release_rows import validated_rows
    from tiny_models import register_tiny_open_clip

    from safetypairs.cli import main
    from safetypairs.publish import write_release
    from safetypairs.release import ReleaseConfig

    release = write_release(validated_rows(6), tmp_path / "release", ReleaseConfig())
    natural = Dataset.from_dict({"image": [demo_photo(n).resize((32, 32)) for n in ("coffee", "rocket", "moon", "clock")],
                                 "label": ["unsafe", "safe", "unsafe", "safe"]})
    natural.save_to_disk(str(tmp_path / "natural"))
    guard = f"clip-zeroshot:open_clip:{register_tiny_open_clip(tmp_path / 'clip')}/none"
    code = main(["evaluate", "--dataset", str(release), "--guard", guard, "--out", str(tmp_path / "run"),
                 "--natural", str(tmp_path / "natural"), "--bootstrap", "50", "--device", "cpu"])
    assert code == 0
    import json

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    cmp = results["natural"][guard]
    assert cmp["n_natural"] == 4 and cmp["n_pairs"] == results["guards"][guard]["metrics"]["n_pairs"]
    assert cmp["gap_pair_accuracy"]["value"] == pytest.approx(
        cmp["natural_accuracy"]["value"] - cmp["release_pair_accuracy"]["value"])
    assert "natural vs pairs" in capsys.readouterr().out
    assert "Natural images vs counterfactual pairs" in (tmp_path / "run" / "report.html").read_text()


def test_source_rows_labelled_by_source_label_are_natural_images():
    """Rows a source labels safe (set aside as not_unsafe by generate) are natural negatives; unlabelled rows are left out."""
    from datasets import Dataset

    from safetypairs.natural import natural_images
    from safetypairs.schema import IMAGE, LABEL, SOURCE_LABEL

    rows = Dataset.from_dict({IMAGE: [None] * 4, SOURCE_LABEL: ["unsafe", "safe", "", "safe"],
                              "candidate": [0, 0, 0, 1]})
    natural = natural_images(rows)
    assert natural[LABEL] == [1, 0] and natural["role"] == ["natural", "natural"]
