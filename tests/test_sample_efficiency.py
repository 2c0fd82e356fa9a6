"""Claim (b): known-answer synthetic problems where the truth is known - a pair-structure effect where pairs
break a spurious feature, none where "pairs" are pairs in name only - and the eval set's disjointness."""

import json

import numpy as np
import pytest

from safetypairs.identity import Identity
from safetypairs.probes.sample_efficiency import (
    ARMS,
    Labelled,
    SweepConfig,
    pair_index,
    plot_png,
    run_sweep,
    write_results,
)
from safetypairs.statuses import SAME_IMAGE, SAME_SOURCE

KS = (2, 4)
C_GRID = (0.1, 1.0, 10.0)


def _identity(name, n, groups=None, digests=None):
    groups = [f"{name}{i}" for i in range(n)] if groups is None else list(groups)
    digests = [f"{name}-img{i}" for i in range(n)] if digests is None else list(digests)
    return Identity(name, np.array([f"{name}:{g}" for g in groups], dtype=object), np.array(digests, dtype=object),
                    np.array(groups, dtype=object))


def synthetic(seed=0, d=16, n_base=200, n_pairs=60, n_eval=400, a_true=1.0, a_spur=2.0, kind="real"):
    """Dimension 0 carries the label everywhere (the true direction); dimension 1 follows the label in the base
    data only (spurious), is random in the eval data, and is shared by both images of a pair.

    ``kind``: ``real`` pairs differ only along dimension 0 (the truth: pairing helps); the nulls, where the
    pairing carries nothing: ``base`` (ordinary base images paired at random), ``noise`` (the edit differs from
    its original only along a noise axis), ``mismatched`` (real pairs with their edits shuffled)."""
    rng = np.random.default_rng(seed)

    def rows(n, spurious_follows_label, prefix):
        y = rng.integers(0, 2, n)
        spurious = (2 * y - 1) if spurious_follows_label else rng.choice([-1, 1], n)
        x = rng.normal(size=(n, d))
        x[:, 0] += a_true * (2 * y - 1)
        x[:, 1] += a_spur * spurious
        return Labelled(x, y, _identity(prefix, n))

    common = rng.normal(size=(n_pairs, d))
    common[:, 1] += a_spur * rng.choice([-1, 1], n_pairs)
    unsafe, safe = common.copy(), common.copy()
    unsafe[:, 0] += a_true
    safe[:, 0] -= a_true
    if kind == "noise":
        safe[:, 0] += 2 * a_true
        safe[:, 5] += 2.0
    elif kind == "base":
        extra = rows(4 * n_pairs, True, "x")
        unsafe, safe = extra.x[extra.y == 1][:n_pairs], extra.x[extra.y == 0][:n_pairs]
    elif kind == "mismatched":
        safe = safe[rng.permutation(n_pairs)]
    pair_ids = np.array([f"p{i}" for i in range(n_pairs)] * 2, dtype=object)
    pairs = Labelled(np.concatenate([unsafe, safe]), np.r_[np.ones(n_pairs, int), np.zeros(n_pairs, int)],
                     _identity("p", 2 * n_pairs, groups=pair_ids), pair_ids)
    return rows(n_base, True, "b"), pairs, rows(n_eval, False, "e")


def _sweep(kind, seed=0, ks=KS, seeds=10):
    base, pairs, evaluation = synthetic(seed=seed, kind=kind, n_eval=300)
    return run_sweep(base, pairs, evaluation,
                     SweepConfig(ks=ks, seeds=seeds, n_bootstrap=300, seed=seed, c_grid=C_GRID), "ocr-text")


@pytest.fixture(scope="module")
def sweep():
    return _sweep("real")


def test_pairs_that_break_a_spurious_feature_show_a_pair_structure_effect(sweep):
    for metric in ("balanced_accuracy", "auroc"):
        effect = sweep["summary"][metric]["effects"]["pair_structure"]
        assert effect["2"]["significant"] and effect["2"]["mean"] > 0.05, (metric, effect["2"])
        assert effect["4"]["mean"] > 0.02, (metric, effect["4"])
    assert any("pair structure (pairs - unpaired, balanced_accuracy) at k=2" in line and "significantly positive"
               in line for line in sweep["findings"])
    assert {r["n_train"] for r in sweep["runs"] if r["k"] == 4} == {8, 16}  # every added arm adds 2k images
    assert {r["arm"] for r in sweep["runs"]} == set(ARMS)


@pytest.mark.parametrize("kind", ["base", "noise", "mismatched"])
def test_pairs_in_name_only_show_no_pair_structure_effect(kind):
    """The truth is 0: at most one of the four (k, metric) intervals may miss it, and the effects average ~0."""
    summary = _sweep(kind, seed=3)["summary"]
    cells = [summary[m]["effects"]["pair_structure"][str(k)] for m in ("balanced_accuracy", "auroc") for k in KS]
    assert sum(c["significant"] for c in cells) <= 1, cells
    assert abs(np.mean([c["mean"] for c in cells])) < 0.03, cells


def test_intervals_are_clipped_to_the_metric_range(sweep):
    for metric in sweep["summary"].values():
        for arm in metric["arms"].values():
            assert all(0.0 <= c["low"] <= c["high"] <= 1.0 for c in arm.values())
        for effect in metric["effects"].values():
            assert all(-1.0 <= c["low"] <= c["high"] <= 1.0 for c in effect.values())


def test_every_probe_picks_its_threshold_on_validation(sweep):
    assert len({r["threshold"] for r in sweep["runs"]}) > 10
    assert all(0.0 < r["threshold"] < 1.0 for r in sweep["runs"])


def test_sweep_is_reproducible():
    first, again = (_sweep("real", ks=(2,), seeds=3) for _ in range(2))
    assert again["runs"] == first["runs"] and again["summary"] == first["summary"]


def test_unpaired_arm_never_holds_a_twin():
    base, pairs, _ = synthetic(n_pairs=12)
    from safetypairs.probes.sample_efficiency import _draw

    complete = pair_index(pairs)
    rows = _draw(base, complete, 6, np.random.default_rng(0))
    originals = {pairs.pair_ids[i] for i in rows["unpaired"] if pairs.y[i] == 1}
    edits = {pairs.pair_ids[i] for i in rows["unpaired"] if pairs.y[i] == 0}
    assert len(originals) == len(edits) == 6 and not originals & edits
    assert originals == {pairs.pair_ids[i] for i in rows["pairs"]}  # the pair arm's originals, other edits


def test_eval_rows_that_are_pair_originals_are_all_excluded():
    """The eval set holds the pair originals under other names (a folder of files, as real data names them):
    every one is left out by its digest, and their own source's other rows with them."""
    base, pairs, evaluation = synthetic(n_eval=40)
    n = len(pair_index(pairs))
    originals = np.flatnonzero(pairs.y == 1)[:10]
    leaky_ids = [f"images/unsafe_{i:02d}.png" for i in range(10)] + [f"images/img_{i:02d}.png" for i in range(40)]
    digests = list(pairs.identity.digests[originals]) + list(evaluation.identity.digests)
    groups = leaky_ids[:10] + leaky_ids[10:]
    groups[10] = leaky_ids[0]  # a natural row of the same source as an original: it goes too
    leaky = Labelled(np.concatenate([pairs.x[originals], evaluation.x]), np.r_[pairs.y[originals], evaluation.y],
                     _identity("eval", 50, groups=groups, digests=digests))
    out = run_sweep(base, pairs, leaky, SweepConfig(ks=(2,), seeds=2, n_bootstrap=100), "ocr-text")
    assert out["eval_exclusion"]["excluded"] == {SAME_IMAGE: 10, SAME_SOURCE: 1}
    assert out["n"]["eval"] == 39 and n == 60


def test_an_eval_set_of_one_class_after_exclusion_is_refused():
    base, pairs, _ = synthetic()
    unsafe = np.flatnonzero(pairs.y == 1)
    only_originals = Labelled(pairs.x, pairs.y, pairs.identity)
    with pytest.raises(ValueError, match="the eval set has no rows after left out 120 of 120 eval rows"):
        run_sweep(base, pairs, only_originals, SweepConfig(ks=(2,), seeds=2, n_bootstrap=100), "ocr-text")
    del unsafe


def test_k_larger_than_the_pool_names_the_fix():
    base, pairs, evaluation = synthetic(n_pairs=5)
    with pytest.raises(ValueError, match="only 5 complete pairs; k=4 needs 8 .* use smaller --k values"):
        run_sweep(base, pairs, evaluation, SweepConfig(ks=(4,), seeds=2, n_bootstrap=100), "ocr-text")
    out = run_sweep(base, pairs, evaluation, SweepConfig(ks=(2, 4), seeds=2, n_bootstrap=100), "ocr-text")
    assert out["skipped"] == {"4": "only 5 complete pairs; k=4 needs 8 (k pairs, and k more for the unpaired edits)"}


def test_write_results_png_svg_json(tmp_path, sweep):
    paths = write_results(sweep, tmp_path / "se")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text()
    assert html.count("<svg") == 1 and "+ k unpaired pair images" in html and "<polygon" in html
    assert "pair structure" in html and "What is excluded" in html and "significantly positive" in html
    saved = json.loads(paths["results"].read_text())
    assert saved["summary"]["balanced_accuracy"]["arms"]["pairs"]["2"]["n"] == 10


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
    with pytest.raises(ValueError, match="allowed: balanced_accuracy, auroc, accuracy"):
        SweepConfig(metric="f1")
    with pytest.raises(ValueError, match="n_bootstrap must be >= 100"):
        SweepConfig(n_bootstrap=10)
    assert SweepConfig(ks=(8, 2, 2)).ks == (2, 8)


def test_cli_embed_train_probe_and_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    """embed -> train-probe -> sample-efficiency with a tiny random open_clip; a rerun makes no encoder call."""
    from datasets import Dataset
    from release_rows import validated_rows
    from tiny_models import build_tiny_open_clip

    from safetypairs.cli import main
    from safetypairs.release.publish import write_release
    from safetypairs.backends.registry import load_backend
    from safetypairs.release.assemble import ReleaseConfig
    from safetypairs.sources import DEMO_PHOTOS, demo_photo

    encoder = f"open_clip:{build_tiny_open_clip(tmp_path / 'clip')}"
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


def test_cli_leaves_out_eval_images_that_are_release_originals(tmp_path, capsys):
    """An eval image folder (metadata.csv, file names as ids, as people make them) that holds copies of the
    release's originals: each copy is left out by content and counted; a folder of nothing else is refused."""
    import csv

    from datasets import Dataset, load_dataset
    from release_rows import validated_rows
    from tiny_models import build_tiny_open_clip

    from safetypairs.cli import main
    from safetypairs.release.publish import write_release
    from safetypairs.release.assemble import ReleaseConfig
    from safetypairs.sources import DEMO_PHOTOS, demo_photo

    encoder = f"open_clip:{build_tiny_open_clip(tmp_path / 'clip')}"
    release = write_release(validated_rows(9), tmp_path / "release", ReleaseConfig())
    originals = [r["image"] for r in load_dataset(str(release), "images", split="test") if r["role"] == 0]
    Dataset.from_dict({"image": [demo_photo(DEMO_PHOTOS[i]).resize((32, 32)) for i in range(8)],
                       "label": [i % 2 for i in range(8)]}).save_to_disk(str(tmp_path / "base"))

    def folder(name, images, labels):
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "label"])
            for i, (image, label) in enumerate(zip(images, labels)):
                image.save(root / "images" / f"img_{i:02d}.png")
                writer.writerow([f"images/img_{i:02d}.png", label])
        return str(root)

    fresh = [demo_photo(DEMO_PHOTOS[8 + i]).resize((32, 32)) for i in range(6)]
    leaky = folder("eval", originals + fresh, ["unsafe"] * len(originals) + ["safe", "unsafe"] * 3)
    common = ["--encoder", encoder, "--device", "cpu", "--k", "1", "--seeds", "2", "--bootstrap", "100"]
    assert main(["sample-efficiency", "--base", str(tmp_path / "base"), "--pairs", str(release), "--eval", leaky,
                 "--out", str(tmp_path / "se"), *common]) == 0
    results = json.loads((tmp_path / "se" / "results.json").read_text())
    assert results["eval_exclusion"]["excluded"] == {SAME_IMAGE: len(originals)}
    assert results["n"]["eval"] == 6
    assert f"left out {len(originals)} of {len(originals) + 6} eval rows" in capsys.readouterr().out
    only = folder("eval-only", originals + originals[:1], ["unsafe"] * len(originals) + ["safe"])
    assert main(["sample-efficiency", "--base", str(tmp_path / "base"), "--pairs", str(release), "--eval", only,
                 "--out", str(tmp_path / "se2"), *common]) == 2
    err = capsys.readouterr().err
    assert "the eval set has no rows after left out" in err and "give held-out images of both classes" in err
