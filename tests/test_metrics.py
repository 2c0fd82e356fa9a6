"""Tests for safetypairs.evaluate.metrics: sklearn agreement, hand-computed pair metrics, bootstrap."""

import numpy as np
import pytest
from sklearn import metrics as skm

import safetypairs
from safetypairs.evaluate.metrics import compute_metrics


def _random_case(seed, n_pairs=200, p_unknown=0.1):
    rng = np.random.default_rng(seed)
    pair_ids = np.repeat(np.arange(n_pairs), 2).astype(str)
    ref = np.tile([1, 0], n_pairs)
    pred = rng.choice([0, 1, -1], size=2 * n_pairs, p=[(1 - p_unknown) / 2, (1 - p_unknown) / 2, p_unknown])
    scores = np.round(rng.random(2 * n_pairs) + 0.4 * ref, 1)  # rounded: many ties
    return pred, ref, pair_ids, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_equal_sklearn(seed):
    pred, ref, pair_ids, scores = _random_case(seed)
    labels = {1: "unsafe", 0: "safe", -1: "unknown"}
    r = compute_metrics([labels[p] for p in pred], [labels[x] for x in ref], pair_ids.tolist(),
                        scores=scores.tolist(), n_bootstrap=0)
    as_miss = np.where(pred == -1, 1 - ref, pred)  # unknown counts as the wrong label
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(ref, as_miss))
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(ref, as_miss))
    assert r["precision"] == pytest.approx(skm.precision_score(ref, as_miss))
    assert r["recall"] == pytest.approx(skm.recall_score(ref, as_miss))
    assert r["specificity"] == pytest.approx(skm.recall_score(ref, as_miss, pos_label=0))
    assert r["f1"] == pytest.approx(skm.f1_score(ref, as_miss))
    assert r["auroc"] == pytest.approx(skm.roc_auc_score(ref, scores))
    tn, fp, fn, tp = skm.confusion_matrix(ref, as_miss).ravel()
    assert r["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert r["n_unknown"] == int((pred == -1).sum())
    fpr, tpr, _ = skm.roc_curve(ref, scores)
    assert r["roc"]["fpr"][-1] == 1.0 and len(r["roc"]["fpr"]) <= 201
    assert np.interp(0.5, r["roc"]["fpr"], r["roc"]["tpr"]) == pytest.approx(np.interp(0.5, fpr, tpr), abs=0.02)


def test_int_labels_and_public_export():
    r = safetypairs.compute_metrics([1, 0, 0, 0], [1, 0, 1, 0], ["a", "a", "b", "b"], n_bootstrap=0)
    assert r["accuracy"] == 0.75 and r["precision"] == 1.0 and r["recall"] == 0.5


def test_pair_metrics_hand_computed():
    # pair a: both right; b: both called unsafe; c: unsafe missed, edit right; d: unknown on the unsafe image
    pred = ["unsafe", "safe", "unsafe", "unsafe", "safe", "safe", "unknown", "safe"]
    ref = ["unsafe", "safe"] * 4
    pairs = ["a", "a", "b", "b", "c", "c", "d", "d"]
    r = compute_metrics(pred, ref, pairs, categories=["O1", "O1", "O1", "O1", "O2", "O2", "O2", "O2"], n_bootstrap=0)
    assert r["n_pairs"] == 4
    assert r["pair_accuracy"] == 0.25  # only a
    assert r["same_label_rate"] == 0.5  # b (unsafe, unsafe) and c (safe, safe)
    assert r["flip_detection_rate"] == 0.5  # flagged originals: a, b; flipped: a
    assert r["n_unknown"] == 1 and r["confusion"] == {"tp": 2, "fp": 1, "tn": 3, "fn": 2}
    assert r["per_category"]["O1"]["pair_accuracy"] == 0.5
    assert r["per_category"]["O2"]["pair_accuracy"] == 0.0
    assert r["per_category"]["O2"]["flip_detection_rate"] is None  # no flagged original in O2
    assert r["auroc"] is None and "roc" not in r


def test_controls_reported_separately():
    pred = ["unsafe", "safe", "safe", "unsafe", "safe", "unsafe"]
    ref = ["unsafe", "safe", "unsafe", "unsafe", "safe", "unsafe"]
    roles = ["original", "edited", "control"] * 2
    pairs = ["a"] * 3 + ["b"] * 3
    r = compute_metrics(pred, ref, pairs, roles=roles, n_bootstrap=0)
    assert r["n"] == 4 and r["accuracy"] == 1.0  # controls excluded from the main numbers
    c = r["control"]
    assert c["n"] == 2 and c["unsafe_rate"] == 0.5 and c["accuracy"] == 0.5
    assert c["agreement_with_original"] == 0.5  # a: control safe vs original unsafe
    assert c["control_pair_accuracy"] == 0.5


def test_same_label_rate_counts_pairs_both_unknown():
    # a: both unknown (the guard told them apart no more than two equal labels); b: unknown + safe; c: right
    pred = ["unknown", "unknown", "unknown", "safe", "unsafe", "safe"]
    ref = ["unsafe", "safe"] * 3
    r = compute_metrics(pred, ref, ["a", "a", "b", "b", "c", "c"], n_bootstrap=0)
    assert r["same_label_rate"] == pytest.approx(1 / 3)  # a only
    assert r["pair_accuracy"] == pytest.approx(1 / 3)  # c only
    assert r["n_unknown"] == 3


def _percentile_bootstrap(pred, ref, pair_ids, n_resamples, seed):
    """An independent 95% percentile bootstrap over pairs: scipy resamples the pair indices, and each statistic
    is plain numpy over the images of the drawn pairs (an unknown prediction counts as the wrong label)."""
    from scipy import stats

    pairs = sorted(set(pair_ids))
    index = np.array([pairs.index(p) for p in pair_ids])
    n_pairs = len(pairs)

    def per_pair(mask):
        return np.bincount(index, weights=mask.astype(float), minlength=n_pairs)

    correct, images = per_pair(pred == ref), per_pair(np.ones_like(ref, dtype=bool))
    tp, fp, fn = per_pair((pred == 1) & (ref == 1)), per_pair((pred != 0) & (ref == 0)), per_pair((pred != 1) & (ref == 1))
    labels = [set(pred[index == k]) for k in range(n_pairs)]
    both_right, same = correct == images, np.array([len(s) == 1 for s in labels], dtype=float)
    sums = {"accuracy": (correct, images), "pair_accuracy": (both_right.astype(float), np.ones(n_pairs)),
            "same_label_rate": (same, np.ones(n_pairs)), "f1": (2 * tp, 2 * tp + fp + fn)}
    out = {}
    for key, (num, den) in sums.items():
        res = stats.bootstrap((np.arange(n_pairs),), lambda k, axis=-1: num[k].sum(axis) / den[k].sum(axis),
                              n_resamples=n_resamples, method="percentile", confidence_level=0.95,
                              vectorized=True, random_state=np.random.default_rng(seed))
        out[key] = (res.confidence_interval.low, res.confidence_interval.high)
    return out


def test_bootstrap_interval_matches_an_independent_percentile_bootstrap():
    pred, ref, pair_ids, scores = _random_case(5, n_pairs=300)
    args = (pred.tolist(), ref.tolist(), pair_ids.tolist())
    a = compute_metrics(*args, scores=scores.tolist(), n_bootstrap=2000, seed=7)
    b = compute_metrics(*args, scores=scores.tolist(), n_bootstrap=2000, seed=7)
    c = compute_metrics(*args, scores=scores.tolist(), n_bootstrap=2000, seed=8)
    assert a["ci"] == b["ci"] and a["ci"] != c["ci"]
    assert a["bootstrap"] == {"n_resamples": 2000, "seed": 7, "unit": "pair", "confidence": 0.95}
    expected = _percentile_bootstrap(pred, ref, pair_ids, n_resamples=4000, seed=123)
    for key, (low, high) in expected.items():
        # Monte Carlo error of a 2.5% / 97.5% quantile here is ~0.005; a 50% interval would be ~3x narrower
        assert a["ci"][key] == pytest.approx([low, high], abs=0.015), key
    low, high = a["ci"]["auroc"]
    assert low < a["auroc"] < high and 0.05 < high - low < 0.2


def test_bootstrap_interval_covers_a_known_accuracy():
    """Known answer: every image is right with probability 0.8, so the 95% interval over pairs should hold 0.8
    in about 95% of simulated benchmarks (a 50% interval would hold it in about half)."""
    rng = np.random.default_rng(11)
    n_pairs, trials, covered = 100, 100, 0
    pair_ids = np.repeat(np.arange(n_pairs), 2).astype(str).tolist()
    ref = np.tile([1, 0], n_pairs)
    for t in range(trials):
        right = rng.random(2 * n_pairs) < 0.8
        pred = np.where(right, ref, 1 - ref)
        low, high = compute_metrics(pred.tolist(), ref.tolist(), pair_ids, n_bootstrap=400, seed=t)["ci"]["accuracy"]
        covered += low <= 0.8 <= high
    assert 85 <= covered <= 100  # binomial(100, 0.95): below 85 has probability < 1e-4


def test_similarity_correlation_finds_errors_on_large_changes():
    n = 60
    changed = np.linspace(0, 1, n)
    pair_ids = np.repeat(np.arange(n), 2).astype(str).tolist()
    ref = ["unsafe", "safe"] * n
    pred = [x for i in range(n) for x in (("unsafe", "unsafe") if changed[i] > 0.5 else ("unsafe", "safe"))]
    r = compute_metrics(pred, ref, pair_ids, similarity={"changed_fraction": np.repeat(changed, 2).tolist()},
                        n_bootstrap=0)
    corr = r["similarity_correlation"]["changed_fraction"]
    assert corr["spearman"] > 0.8 and corr["n_pairs"] == n
    assert corr["error_rate_by_tercile"][0] == 0.0 and corr["error_rate_by_tercile"][2] == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="references\\[1\\]"):
        compute_metrics(["safe", "safe"], ["safe", "maybe"], ["a", "a"])
    with pytest.raises(ValueError, match="differ in length"):
        compute_metrics(["safe"], ["safe", "unsafe"], ["a", "a"])
