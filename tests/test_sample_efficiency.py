"""Sample efficiency: a known-answer synthetic problem where only counterfactual pairs reveal the true direction."""

import json

import numpy as np
import pytest

from safetypairs.sample_efficiency import (
    Labelled,
    SweepConfig,
    disjoint_eval,
    mean_ci,
    pair_index,
    plot_png,
    run_sweep,
    write_results,
)


def synthetic(seed=0, d=16, n_base=200, n_pairs=60, n_eval=400, a_true=1.0, a_spur=2.0):
    """Dimension 0 carries the label everywhere (the true direction); dimension 1 follows the label in
    the base data only (spurious), is random in the eval data, and is shared by both images of a pair,
    which differ only along dimension 0."""
    rng = np.random.default_rng(seed)

    def rows(n, spurious_follows_label, prefix):
        y = rng.integers(0, 2, n)
        spurious = (2 * y - 1) if spurious_follows_label else rng.choice([-1, 1], n)
        x = rng.normal(size=(n, d))
        x[:, 0] += a_true * (2 * y - 1)
        x[:, 1] += a_spur * spurious
        return Labelled(x, y, np.array([f"{prefix}{i}" for i in range(n)], dtype=object))

    common = rng.normal(size=(n_pairs, d))
    common[:, 1] += a_spur * rng.choice([-1, 1], n_pairs)
    unsafe, safe = common.copy(), common.copy()
    unsafe[:, 0] += a_true
    safe[:, 0] -= a_true
    pairs = Labelled(np.concatenate([unsafe, safe]), np.r_[np.ones(n_pairs, int), np.zeros(n_pairs, int)],
                     np.array([f"p{i}" for i in range(n_pairs)] * 2, dtype=object))
    return rows(n_base, True, "b"), pairs, rows(n_eval, False, "e")


@pytest.fixture(scope="module")
def sweep():
    base, pairs, evaluation = synthetic()
    return run_sweep(base, pairs, evaluation, SweepConfig(ks=(2, 4, 8, 64), seeds=8), "ocr-text")


def test_pairs_beat_base_and_more_data_does_not_explain_it(sweep):
    summary = sweep["summary"]["balanced_accuracy"]
    for k in ("2", "4", "8"):
        pair_gain, random_gain = summary["gain_over_base"]["pairs"][k], summary["gain_over_base"]["random"][k]
        assert pair_gain["low"] > 0.05, (k, pair_gain)  # the CI of the paired gain excludes zero
        assert random_gain["mean"] < 0.3 * pair_gain["mean"], (k, random_gain, pair_gain)
        assert summary["arms"]["pairs"][k]["mean"] > summary["arms"]["random"][k]["mean"] + 0.05
        assert summary["arms"]["base"][k]["mean"] < 0.65  # the base probe leans on the spurious direction
    assert sweep["skipped"] == {"64": "the base set has 95 rows of its smaller class; k=64 needs 128 (k + k extra)"}
    assert {r["n_train"] for r in sweep["runs"] if r["k"] == 4} == {8, 16}  # both added arms add 2k images


def test_sweep_is_reproducible(sweep):
    base, pairs, evaluation = synthetic()
    again = run_sweep(base, pairs, evaluation, SweepConfig(ks=(2, 4, 8, 64), seeds=8), "ocr-text")
    assert again["runs"] == sweep["runs"]


def test_eval_rows_sharing_a_source_with_training_are_dropped():
    base, pairs, evaluation = synthetic(n_eval=10)
    leaky = Labelled(evaluation.x, evaluation.y, np.array(["b0", "p3"] + list(evaluation.groups[2:]), dtype=object))
    kept, dropped = disjoint_eval(leaky, base, pairs)
    assert dropped == 2 and len(kept.y) == 8 and "b0" not in kept.groups
    assert len(pair_index(pairs)) == 60


def test_mean_ci_is_the_student_t_interval():
    ci = mean_ci([0.5, 0.7, 0.6])
    assert ci["mean"] == pytest.approx(0.6) and ci["high"] - ci["mean"] == pytest.approx(4.303 * 0.1 / np.sqrt(3), rel=1e-3)
    assert mean_ci([0.4])["low"] is None and mean_ci([])["mean"] is None


def test_write_results_png_svg_json(tmp_path, sweep):
    paths = write_results(sweep, tmp_path / "se")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text()
    assert html.count("<svg") == 1 and "+ k pairs" in html and "<polygon" in html
    assert json.loads(paths["results"].read_text())["summary"]["balanced_accuracy"]["arms"]["pairs"]["2"]["n"] == 8


def test_plot_png_leaves_the_callers_matplotlib_backend_alone(tmp_path, sweep):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook's inline backend stands in; plot_png used to switch it to Agg
    try:
        path = plot_png(sweep, tmp_path / "curve.png")
        assert matplotlib.get_backend() == "svg"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)


def test_config_checks_values():
    with pytest.raises(ValueError, match="seeds must be >= 2"):
        SweepConfig(seeds=1)
    with pytest.raises(ValueError, match="allowed: balanced_accuracy, accuracy, auroc"):
        SweepConfig(metric="f1")
    assert SweepConfig(ks=(8, 2, 2)).ks == (2, 8)


def test_cli_embed_train_probe_and_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    """embed -> train-probe -> sample-efficiency with a tiny random open_clip; a rerun makes no encoder call."""
    from datasets import Dataset
    from release_rows import validated_rows
    from tiny_models import register_tiny_open_clip

    from safetypairs.cli import main
    from safetypairs.publish import write_release
    from safetypairs.registry import load_backend
    from safetypairs.release import ReleaseConfig
    from safetypairs.sources import DEMO_PHOTOS, demo_photo

    encoder = f"open_clip:{register_tiny_open_clip(tmp_path / 'clip')}/none"
    backend, calls = load_backend("encoders", encoder, "cpu"), []
    original = backend.embed
    monkeypatch.setattr(backend, "embed", lambda images: calls.append(len(images)) or original(images))
    release = write_release(validated_rows(6), tmp_path / "release", ReleaseConfig())
    for name, offset in (("base", 0), ("eval", 8)):
        Dataset.from_dict({"image": [demo_photo(DEMO_PHOTOS[(offset + i) % 16]).resize((32, 32)) for i in range(8)],
                           "label": [i % 2 for i in range(8)],
                           "source_id": [f"{name}{i}" for i in range(8)]}).save_to_disk(str(tmp_path / name))
    common = ["--encoder", encoder, "--device", "cpu"]
    assert main(["embed", "--dataset", str(release), "--out", str(tmp_path / "emb"), *common]) == 0
    assert main(["train-probe", "--train", str(tmp_path / "base"), "--pairs", str(tmp_path / "emb"),
                 "--out", str(tmp_path / "probe"), *common]) == 0
    assert f"linear-probe:{tmp_path / 'probe'}" in capsys.readouterr().out
    sweep = ["sample-efficiency", "--base", str(tmp_path / "base"), "--pairs", str(release), "--eval",
             str(tmp_path / "eval"), "--k", "1,2,3", "--seeds", "2", "--out", str(tmp_path / "se"), *common]
    assert main(sweep) == 0
    out = capsys.readouterr().out
    assert "k=  1" in out and "k=3 skipped" in out and (tmp_path / "se" / "curve.png").is_file()
    n_calls = len(calls)
    assert main(sweep) == 0
    assert len(calls) == n_calls, "the second sweep re-embedded cached data"
    assert main(["sample-efficiency", "--base", str(tmp_path / "base"), "--pairs", str(tmp_path / "emb"),
                 "--eval", str(tmp_path / "eval"), "--encoder", "ocr-text", "--out", str(tmp_path / "x")]) == 2
    assert "holds embeddings of" in capsys.readouterr().err
