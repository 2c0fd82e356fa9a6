"""Claim (a): the release's pairs against natural images, like with like (per class, balanced, matched pairs)."""

import json

import numpy as np
import pytest
from datasets import Dataset

from safetypairs.evaluate.natural import (
    NATURAL_ROLE,
    POOLED,
    natural_comparison,
    natural_images,
    select_natural,
)
from safetypairs.policy import load_policy
from safetypairs.statuses import OUTSIDE_POLICY
from safetypairs.sources import demo_photo

PRED = "guard_pred"


def _release(outcomes: list[tuple[bool, bool]]) -> dict:
    """A release's predictions: per pair, whether the guard is right on the original and on the edit
    (each pair also has a control, which must not count)."""
    table = {"label": [], "pair_id": [], "role": [], PRED: []}
    for i, (orig_ok, edit_ok) in enumerate(outcomes):
        for role, label, pred in (("original", 1, "unsafe" if orig_ok else "safe"),
                                  ("edited", 0, "safe" if edit_ok else "unsafe"),
                                  ("control", 1, "safe")):
            table["label"].append(label)
            table["pair_id"].append(f"p{i}")
            table["role"].append(role)
            table[PRED].append(pred)
    return table


def _natural(rows: list[tuple[str, int, bool]]) -> dict:
    """Natural predictions from (category, label, right?) rows."""
    names = {1: "unsafe", 0: "safe"}
    return {"category": [c for c, _, _ in rows], "label": [y for _, y, _ in rows],
            PRED: [names[y] if ok else names[1 - y] for _, y, ok in rows]}


def test_hand_computed_rates_and_matched_natural_pairs():
    # release: 10 pairs; originals right 8/10, edits right 5/10, both right 4/10
    outcomes = [(True, True)] * 4 + [(True, False)] * 4 + [(False, True)] * 1 + [(False, False)] * 1
    # natural: O1 4 unsafe (3 right) + 2 safe (2 right); O2 2 unsafe (1 right) only; no category 2 safe (1 right)
    natural = _natural([("O1", 1, True)] * 3 + [("O1", 1, False)] + [("O1", 0, True)] * 2
                       + [("O2", 1, True), ("O2", 1, False)] + [("", 0, True), ("", 0, False)])
    out = natural_comparison(_release(outcomes), natural, {"g": PRED}, n_bootstrap=0)["g"]
    assert out["release"]["unsafe_recall"]["value"] == pytest.approx(0.8)
    assert out["release"]["safe_specificity"]["value"] == pytest.approx(0.5)
    assert out["release"]["balanced_accuracy"]["value"] == pytest.approx(0.65)
    assert out["release"]["pair_accuracy"]["value"] == pytest.approx(0.4)
    assert out["release_outcomes"] == {"both_right": 4, "original_only": 4, "edit_only": 1, "neither": 1}
    assert out["natural"]["unsafe_recall"]["value"] == pytest.approx(4 / 6)
    assert out["natural"]["safe_specificity"]["value"] == pytest.approx(3 / 4)
    # O1 holds both labels: 2 matched pairs at 3/4 x 2/2; O2 and the uncategorised rows pool: 2 pairs at 1/2 x 1/2
    assert out["strata"] == {"O1": 2, POOLED: 2}
    assert out["natural"]["pair_accuracy"]["value"] == pytest.approx((2 * 0.75 + 2 * 0.25) / 4)
    assert out["gap"]["pair_accuracy"]["value"] == pytest.approx(0.5 - 0.4)
    assert out["gap"]["balanced_accuracy"]["value"] == pytest.approx((4 / 6 + 3 / 4) / 2 - 0.65)
    assert out["gap"]["pair_accuracy"]["ci"] is None


def _simulated(error: float, n_pairs: int, n_natural: int, seed: int):
    """A guard wrong on each image independently with probability ``error``, on pairs and natural images alike."""
    rng = np.random.default_rng(seed)
    outcomes = [tuple(rng.random(2) >= error) for _ in range(n_pairs)]
    labels = rng.integers(0, 2, n_natural)
    natural = _natural([(f"O{1 + i % 3}", int(y), bool(rng.random() >= error)) for i, y in enumerate(labels)])
    return _release(outcomes), natural


def test_a_guard_equally_wrong_everywhere_shows_no_gap():
    """10% error on every image: a pair needs two right answers (0.81) and so does a matched natural pair, so
    the headline gap's interval covers 0 (under the old comparison of per-image accuracy with pair accuracy it
    was 'significant'); the balanced gap too."""
    covered = {"pair_accuracy": 0, "balanced_accuracy": 0}
    for seed in range(10):
        release, natural = _simulated(0.1, n_pairs=150, n_natural=300, seed=seed)
        out = natural_comparison(release, natural, {"g": PRED}, n_bootstrap=400, seed=seed)["g"]
        for rate in covered:
            low, high = out["gap"][rate]["ci"]
            covered[rate] += low <= 0 <= high
    assert covered["pair_accuracy"] >= 8 and covered["balanced_accuracy"] >= 8, covered


def test_pairs_that_a_guard_cannot_tell_apart_are_harder():
    """A guard that gives both images of a pair the same answer (right on natural images): a real gap."""
    release = _release([(True, False)] * 30 + [(False, True)] * 30)
    natural = _natural([("O1", 1, True)] * 40 + [("O1", 0, True)] * 40)
    out = natural_comparison(release, natural, {"g": PRED}, n_bootstrap=300, seed=0)["g"]
    assert out["gap"]["pair_accuracy"]["value"] == pytest.approx(1.0)
    assert out["gap"]["pair_accuracy"]["ci"][0] > 0.5
    assert "pairs are significantly harder" in out["finding"]


def test_an_always_safe_guard_has_no_balanced_gap():
    """Calls everything safe: 80%-safe natural set (raw accuracy 0.8) vs pairs (raw 0.5) - no gap once balanced."""
    release = _release([(False, True)] * 20)
    natural = _natural([("O1", 1, False)] * 20 + [("O1", 0, True)] * 80)
    out = natural_comparison(release, natural, {"g": PRED}, n_bootstrap=200, seed=0)["g"]
    assert out["natural"]["balanced_accuracy"]["value"] == 0.5 == out["release"]["balanced_accuracy"]["value"]
    assert out["gap"]["balanced_accuracy"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert out["gap"]["pair_accuracy"]["value"] == 0.0


def test_intervals_stay_in_range():
    release = _release([(True, True)] * 3)
    natural = _natural([("O1", 1, True)] * 3 + [("O1", 0, True)] * 3)
    out = natural_comparison(release, natural, {"g": PRED}, n_bootstrap=200, seed=0)["g"]
    for side in ("natural", "release"):
        for cell in out[side].values():
            assert 0.0 <= cell["ci"][0] <= cell["ci"][1] <= 1.0
    for cell in out["gap"].values():
        assert -1.0 <= cell["ci"][0] <= cell["ci"][1] <= 1.0


def test_natural_images_shape():
    rows = Dataset.from_dict({"image": [demo_photo("coffee").resize((16, 16))] * 2, "label": [0, 1], "extra": [1, 2],
                              "source_id": ["a.png", "b.png"]})
    out = natural_images(rows)
    assert out.column_names == ["image", "label", "source_id", "category", "pair_id", "role"]
    assert out["role"] == [NATURAL_ROLE] * 2 and len(set(out["pair_id"])) == 2
    with pytest.raises(ValueError, match="need columns \\['label'\\]"):
        natural_images(rows.remove_columns("label"))


def test_select_natural_leaves_out_release_images_and_rows_outside_the_policy(tmp_path):
    """The README's `--natural my_data` holds the pair originals themselves: they (and nothing else from
    their sources' folder names) are left out, and a Spam row the policy does not cover is counted apart."""
    from datasets import load_dataset
    from release_rows import validated_rows

    from safetypairs.release.publish import write_release
    from safetypairs.release.assemble import ReleaseConfig

    release = write_release(validated_rows(4), tmp_path / "release", ReleaseConfig())
    images = load_dataset(str(release), "images", split="test")
    originals = [row["image"] for row in images if row["role"] == 0]
    other = [demo_photo(n).resize((40, 30)) for n in ("coffee", "moon", "clock")]
    natural = natural_images(Dataset.from_dict({
        "image": originals + other,
        "label": ["unsafe"] * len(originals) + ["safe", "unsafe", "safe"],
        "category": ["O1"] * len(originals) + ["NA: None applying", "O1: Hate, Humiliation, Harassment", "Spam"],
        # the release's own source ids on other photos: a name is not an identity
        "source_id": [f"other/{i}.png" for i in range(len(originals))] + list(images["source_id"][:3]),
    }))
    chosen = select_natural(natural, images, load_policy("llavaguard"))
    assert chosen.account["excluded"] == {OUTSIDE_POLICY: 1, "same_image": len(originals)}
    assert chosen.account["outside_categories"] == {"Spam": 1}
    assert chosen.rows["category"] == ["", "O1"]
    assert chosen.account["by_category"] == {"(none)": {"safe": 1, "unsafe": 0}, "O1": {"safe": 0, "unsafe": 1}}
    assert chosen.account["compared"] == 2 and "Spam" in chosen.account["sentence"]


def test_evaluate_cli_compares_natural_images_with_pairs(tmp_path, capsys):
    from release_rows import validated_rows
    from tiny_models import build_tiny_open_clip

    from safetypairs.cli import main
    from safetypairs.release.publish import write_release
    from safetypairs.release.assemble import ReleaseConfig

    release = write_release(validated_rows(6), tmp_path / "release", ReleaseConfig())
    natural = Dataset.from_dict({"image": [demo_photo(n).resize((32, 32)) for n in ("coffee", "rocket", "moon", "clock")],
                                 "label": ["unsafe", "safe", "unsafe", "safe"]})
    natural.save_to_disk(str(tmp_path / "natural"))
    guard = f"clip-zeroshot:open_clip:{build_tiny_open_clip(tmp_path / 'clip')}"
    code = main(["evaluate", "--dataset", str(release), "--guard", guard, "--out", str(tmp_path / "run"),
                 "--natural", str(tmp_path / "natural"), "--bootstrap", "50", "--device", "cpu"])
    assert code == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    cmp = results["natural"][guard]
    assert cmp["n_natural"] == {"unsafe": 2, "safe": 2} and cmp["n_natural_pairs"] == 2
    assert cmp["n_pairs"] == results["guards"][guard]["metrics"]["n_pairs"]
    assert results["natural_set"]["compared"] == 4 and results["natural_set"]["excluded"] == {}
    out = capsys.readouterr().out
    assert "pair_accuracy natural vs pairs" in out and "natural images: 4 of 4" in out
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Natural images vs counterfactual pairs" in html and "What is excluded" in html


def test_evaluate_cli_refuses_a_natural_set_that_is_all_release_images(tmp_path, capsys):
    from datasets import load_dataset
    from release_rows import validated_rows

    from safetypairs.cli import main
    from safetypairs.release.publish import write_release
    from safetypairs.release.assemble import ReleaseConfig

    release = write_release(validated_rows(3), tmp_path / "release", ReleaseConfig())
    images = load_dataset(str(release), "images", split="test")
    images.select_columns(["image", "label"]).save_to_disk(str(tmp_path / "natural"))
    code = main(["evaluate", "--dataset", str(release), "--guard", "ocr-lexicon", "--out", str(tmp_path / "run"),
                 "--natural", str(tmp_path / "natural")])
    err = capsys.readouterr().err
    assert code == 2 and "no natural image left to compare" in err and "same_image" in err
    assert not (tmp_path / "run").exists()


def test_source_rows_labelled_by_source_label_are_natural_images():
    """Rows a source labels safe (set aside as not_unsafe by generate) are natural negatives; unlabelled rows are left out."""
    from safetypairs.schema import IMAGE, LABEL, SOURCE_LABEL

    rows = Dataset.from_dict({IMAGE: [None] * 4, SOURCE_LABEL: ["unsafe", "safe", "", "safe"],
                              "candidate": [0, 0, 0, 1]})
    natural = natural_images(rows)
    assert natural[LABEL] == [1, 0] and natural["role"] == ["natural", "natural"]


def test_natural_predictions_share_the_runner_chunks_and_equal_predicting_them_alone(tmp_path):
    """The natural images follow the release's in the run's input (so the ranks share them like the release's chunks,
    none left for rank 0 after the others finished): the comparison equals the one made from the natural images
    predicted on their own, and the release's predictions and statuses keep to the release."""
    from collections import Counter

    from release_rows import validated_rows
    from tiny_models import build_tiny_open_clip

    from safetypairs.engine.datafiles import load_release
    from safetypairs.engine.folders import read_json
    from safetypairs.engine.runner import RunConfig
    from safetypairs.evaluate.scoring import guard_columns
    from safetypairs.evaluate.stage import EvaluateConfig, evaluate_run, predict
    from safetypairs.release.assemble import ReleaseConfig
    from safetypairs.release.publish import write_release

    release = write_release(validated_rows(6), tmp_path / "release", ReleaseConfig())
    natural = natural_images(Dataset.from_dict({
        "image": [demo_photo(n).resize((32, 32)) for n in ("coffee", "rocket", "moon", "clock", "astronaut")],
        "label": ["unsafe", "safe", "unsafe", "safe", "safe"]}))
    guard = f"clip-zeroshot:open_clip:{build_tiny_open_clip(tmp_path / 'clip')}"
    config = EvaluateConfig(guards=(guard,), device="cpu", n_bootstrap=50)
    results = evaluate_run(str(release), config, RunConfig(tmp_path / "run", chunk_size=4), natural=natural)

    images = load_release(str(release), "images", "auto")
    meta = read_json(tmp_path / "run" / "run.json")
    n_rows = len(images) + len(natural)
    assert meta["rows_in"] == n_rows and len(meta["timings"]["chunk_ranks_last_run"]) == -(-n_rows // 4)
    alone = predict(select_natural(natural, images, load_policy("llavaguard")).rows, config)[0]
    written = Dataset.from_parquet(str(tmp_path / "run" / "predictions.parquet"))
    assert len(written) == len(images) and written.features["role"] == images.features["role"]
    assert written["pair_id"] == images["pair_id"] and written["label"] == images["label"]
    expected = natural_comparison(written, alone, {guard: guard_columns(guard)["pred"]}, n_bootstrap=50, seed=0)
    assert results["natural"] == json.loads(json.dumps(expected))
    statuses = results["guards"][guard]["statuses"]
    assert statuses == dict(Counter(written[guard_columns(guard)["status"]])) and sum(statuses.values()) == len(images)


def test_two_processes_share_the_natural_images_and_give_the_comparison_of_one(tmp_path):
    import pyarrow.parquet as pq
    from release_rows import validated_rows
    from slow_backends import _cli

    from safetypairs.engine.folders import read_json
    from safetypairs.release.assemble import ReleaseConfig
    from safetypairs.release.publish import write_release

    release = write_release(validated_rows(6), tmp_path / "release", ReleaseConfig())
    Dataset.from_dict({"image": [demo_photo(n).resize((32, 32)) for n in ("coffee", "rocket", "moon", "clock", "astronaut")],
                       "label": ["unsafe", "safe", "unsafe", "safe", "safe"]}).save_to_disk(str(tmp_path / "natural"))

    def run(out, launcher=()):
        _cli(["evaluate", "--dataset", str(release), "--guard", "slow", "--device", "cpu", "--bootstrap", "30",
              "--natural", str(tmp_path / "natural"), "--chunk-size", "3", "--out", str(out)], launcher=launcher)
        return json.loads((out / "results.json").read_text()), pq.read_table(out / "predictions.parquet")

    one, one_preds = run(tmp_path / "one")
    two, two_preds = run(tmp_path / "two", launcher=("--standalone", "--nproc_per_node", "2"))
    assert two["natural"] == one["natural"] and two["natural_set"] == one["natural_set"]
    assert two_preds.equals(one_preds) and two["guards"]["slow"]["statuses"] == one["guards"]["slow"]["statuses"]
    meta = read_json(tmp_path / "two" / "run.json")
    assert meta["num_processes"] == 2 and meta["rows_in"] == one["n_images"] + 5
    assert one["natural"]["slow"]["n_natural"] == {"unsafe": 2, "safe": 3}
