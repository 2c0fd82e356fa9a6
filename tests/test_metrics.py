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


def test_bootstrap_is_reproducible_and_brackets_the_point():
    pred, ref, pair_ids, scores = _random_case(5, n_pairs=300)
    args = (pred.tolist(), ref.tolist(), pair_ids.tolist())
    a = compute_metrics(*args, scores=scores.tolist(), n_bootstrap=300, seed=7)
    b = compute_metrics(*args, scores=scores.tolist(), n_bootstrap=300, seed=7)
    c = compute_metrics(*args, scores=scores.tolist(), n_bootstrap=300, seed=8)
    assert a["ci"] == b["ci"] and a["ci"] != c["ci"]
    for key in ("accuracy", "f1", "pair_accuracy", "auroc", "same_label_rate"):
        low, high = a["ci"][key]
        assert low <= a[key] <= high and high - low < 0.2
    assert a["bootstrap"] == {"n_resamples": 300, "seed": 7, "unit": "pair", "confidence": 0.95}


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
