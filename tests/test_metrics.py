"""Tests for safetypairs.evaluate.metrics: sklearn agreement, hand-computed pair metrics, bootstrap."""

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

import safetypairs
from safetypairs.evaluate.metrics import compute_metrics, encode_labels


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
    with pytest.raises(ValueError, match="differ in length"):
        compute_metrics(["safe", "unsafe"], ["safe", "unsafe"], ["a"])


@pytest.mark.parametrize("kwargs, message", [
    ({"categories": ["O1"] * 3}, "categories has 3 values for 2 predictions"),
    ({"roles": ["original"] * 3}, "roles has 3 values for 2 predictions"),
    ({"scores": [0.5] * 3}, "scores has 3 values for 2 predictions"),
    ({"similarity": {"lpips": [0.5] * 3}}, r"similarity\['lpips'\] has 3 values for 2 predictions"),
])
def test_a_column_of_the_wrong_length_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(["safe", "unsafe"], ["safe", "unsafe"], ["a", "a"], n_bootstrap=0, **kwargs)


def test_encode_labels_maps_every_accepted_form():
    values = [" Unsafe ", "SAFE", "1", "0", 1, 0, True, False, np.int64(1), np.bool_(False), 1.0, 0.0,
              2.0, 0.5, None, "maybe", [1]]
    codes = encode_labels(values, "predictions", allow_unknown=True)
    assert codes.dtype == np.int8
    assert codes.tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, -1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match=r"^labels\[2\] = 'x'; allowed: safe, unsafe or 0 \(safe\) / 1 \(unsafe\)$"):
        encode_labels(["safe", 1, "x"], "labels", allow_unknown=False)


def test_default_bootstrap_settings():
    r = compute_metrics(["safe", "unsafe"], ["safe", "unsafe"], ["a", "a"])
    assert r["bootstrap"] == {"n_resamples": 1000, "seed": 0, "unit": "pair", "confidence": 0.95}


def test_counts_rates_and_auroc_hand_computed():
    # pair a: two unsafe images (not a pair), b: unsafe + safe, c: one safe image; the second image is unknown
    # and unscored. AUROC over the 4 scored: unsafe 0.9 beats both safe images, unsafe 0.2 beats 0.1 only: 3/4.
    r = compute_metrics(["unsafe", "unknown", "safe", "safe", "unsafe"], ["unsafe", "unsafe", "unsafe", "safe", "safe"],
                        ["a", "a", "b", "b", "c"], scores=[0.9, None, 0.2, 0.1, 0.8], n_bootstrap=0)
    assert (r["n"], r["n_unsafe"], r["n_safe"], r["n_unknown"], r["n_scored"], r["n_pairs"]) == (5, 3, 2, 1, 4, 1)
    assert r["unknown_rate"] == 0.2 and r["auroc"] == 0.75
    assert r["ci"] == {}  # n_bootstrap=0 turns intervals off


def test_bootstrap_with_one_resample_and_one_pair():
    r = compute_metrics(["unsafe", "unsafe"], ["unsafe", "safe"], ["a", "a"], n_bootstrap=1)
    assert r["ci"]["accuracy"] == [0.5, 0.5] and r["ci"]["pair_accuracy"] == [0.0, 0.0]
    assert r["ci"]["same_label_rate"] == [1.0, 1.0] and r["ci"]["auroc"] is None  # no scores


def test_bootstrap_interval_equals_a_plain_loop_over_the_same_draws():
    """The bootstrap draws ``np.random.default_rng(seed).integers(n_pairs, size=(B, n_pairs))`` over the pairs in
    sorted id order; here sklearn recomputes each statistic with the draw counts as sample weights."""
    pred, ref, pair_ids, scores = _random_case(3, n_pairs=30)
    n_boot, seed = 200, 4
    r = compute_metrics(pred.tolist(), ref.tolist(), pair_ids.tolist(), scores=scores.tolist(), n_bootstrap=n_boot,
                        seed=seed)
    pairs = sorted(set(pair_ids))
    index = np.array([pairs.index(p) for p in pair_ids])
    as_miss = np.where(pred == -1, 1 - ref, pred)
    values = {"accuracy": [], "balanced_accuracy": [], "auroc": []}
    for row in np.random.default_rng(seed).integers(len(pairs), size=(n_boot, len(pairs))):
        w = np.bincount(row, minlength=len(pairs))[index]
        values["accuracy"].append(skm.accuracy_score(ref, as_miss, sample_weight=w))
        values["balanced_accuracy"].append(skm.balanced_accuracy_score(ref, as_miss, sample_weight=w))
        values["auroc"].append(skm.roc_auc_score(ref, scores, sample_weight=w))
    for key, v in values.items():
        assert r["ci"][key] == pytest.approx(np.quantile(v, [0.025, 0.975]).tolist()), key


def test_per_category_hand_computed():
    # O1: pair a right, pair c misses its unsafe image; O2: pair b (safe, unsafe, safe) calls the first safe image
    # unsafe; pair d has no category and shows up in no category.
    pred = ["unsafe", "safe", "unsafe", "unsafe", "safe", "safe", "safe", "unsafe", "unsafe"]
    ref = ["unsafe", "safe", "safe", "unsafe", "safe", "unsafe", "safe", "unsafe", "safe"]
    pairs = ["a", "a", "b", "b", "b", "c", "c", "d", "d"]
    cats = ["O1", "O1", "O2", "O2", "O2", "O1", "O1", None, None]
    scores = [0.9, 0.1, 0.8, 0.2, 0.1, 0.5, 0.4, 0.5, 0.5]
    r = compute_metrics(pred, ref, pairs, categories=cats, scores=scores, n_bootstrap=0)
    assert set(r["per_category"]) == {"O1", "O2"} and all(type(code) is str for code in r["per_category"])
    o1, o2 = r["per_category"]["O1"], r["per_category"]["O2"]
    assert (o1["accuracy"], o1["auroc"], o1["pair_accuracy"], o1["n_pairs"]) == (0.75, 1.0, 0.5, 2)
    # O2 AUROC: the unsafe 0.2 loses to the safe 0.8 and beats the safe 0.1
    assert (o2["accuracy"], o2["auroc"], o2["pair_accuracy"], o2["same_label_rate"]) == (pytest.approx(2 / 3), 0.5, 0.0, 0.0)


def test_per_category_intervals_are_seeded():
    pred, ref, pair_ids, scores = _random_case(4, n_pairs=60)
    cats = np.where(pair_ids.astype(int) % 2, "O1", "O2").tolist()
    a, b = (compute_metrics(pred.tolist(), ref.tolist(), pair_ids.tolist(), categories=cats, scores=scores.tolist(),
                            n_bootstrap=200, seed=3)["per_category"] for _ in range(2))
    assert a["O1"]["ci"] == b["O1"]["ci"] and a["O2"]["ci"] == b["O2"]["ci"]


def test_controls_hand_computed():
    # pairs a, b, c: original, edited, control (every reference unsafe but the edits). Controls: a unsafe, b and c
    # unknown. Originals: a unsafe, b unsafe, c safe; edits all safe.
    pred = ["unsafe", "safe", "unsafe", "unsafe", "safe", "unknown", "safe", "safe", "unknown"]
    ref = ["unsafe", "safe", "unsafe"] * 3
    r = compute_metrics(pred, ref, ["a"] * 3 + ["b"] * 3 + ["c"] * 3, roles=["original", "edited", "control"] * 3,
                        n_bootstrap=0)
    assert r["control"] == pytest.approx({"n": 3, "accuracy": 1 / 3, "unsafe_rate": 1 / 3, "n_unknown": 2,
                                          "agreement_with_original": 1 / 3,  # a only
                                          "control_pair_accuracy": 1 / 3})  # a: control unsafe, edit safe


def test_a_lone_control_is_reported_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = compute_metrics(["unsafe"], ["unsafe"], ["z"], roles=["control"], n_bootstrap=10)
    assert r["control"] == {"n": 1, "accuracy": 1.0, "unsafe_rate": 1.0, "n_unknown": 0,
                            "agreement_with_original": None, "control_pair_accuracy": None}
    assert r["n"] == 0 and r["accuracy"] is None and r["ci"] == {}


def test_roc_points_equal_sklearn():
    rng = np.random.default_rng(0)
    ref = np.tile([1, 0, 0], 99)  # 99 unsafe, 198 safe: rates with more than 5 decimals
    scores = rng.integers(60, size=ref.size) / 60 + 0.2 * ref  # about 70 distinct scores, with ties
    fpr, tpr, _ = skm.roc_curve(ref, scores, drop_intermediate=False)
    roc = compute_metrics(ref.tolist(), ref.tolist(), np.arange(ref.size).astype(str).tolist(), scores=scores.tolist(),
                          n_bootstrap=0)["roc"]
    assert 50 < len(fpr) <= 201
    assert roc == {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


def test_roc_is_thinned_to_201_points():
    ref = np.tile([1, 0], 500)
    scores = np.arange(1000) / 1000  # 1000 distinct scores: 1001 points, every fifth kept
    fpr, tpr, _ = skm.roc_curve(ref, scores, drop_intermediate=False)
    roc = compute_metrics(ref.tolist(), ref.tolist(), np.arange(1000).astype(str).tolist(), scores=scores.tolist(),
                          n_bootstrap=0)["roc"]
    assert roc == {"fpr": [round(float(v), 5) for v in fpr[::5]], "tpr": [round(float(v), 5) for v in tpr[::5]]}


def _pairs_with_errors(wrong):
    """Predictions, references and pair ids of (unsafe, safe) pairs, pair ``i`` wrong (both unsafe) where ``wrong[i]``."""
    pred = [x for w in wrong for x in (("unsafe", "unsafe") if w else ("unsafe", "safe"))]
    return pred, ["unsafe", "safe"] * len(wrong), np.repeat(np.arange(len(wrong)), 2).astype(str).tolist()


def test_similarity_correlation_hand_computed():
    x, wrong = np.arange(7.0), [0, 0, 1, 1, 1, 0, 0]
    pred, ref, pairs = _pairs_with_errors(wrong)
    column = np.repeat(x, 2).tolist()
    column[2:4] = [-1.0, 3.0]  # pair 1: the mean of its images, 1
    column[13] = None  # pair 6: its other image, 6
    # and one lone image, not a pair: left out
    r = compute_metrics(pred + ["unsafe"], ref + ["unsafe"], pairs + ["lone"], similarity={"d": column + [100.0]},
                        n_bootstrap=0)
    corr = r["similarity_correlation"]["d"]
    rho = stats.spearmanr(x, wrong)
    assert corr["n_pairs"] == 7
    assert (corr["pearson"], corr["spearman"], corr["spearman_p"]) == pytest.approx(
        (stats.pearsonr(x, wrong).statistic, rho.statistic, rho.pvalue))
    # np.quantile (linear) of 0..6: edges 0, 2, 4, 6; a value on an inner edge goes to the upper tercile
    assert corr["tercile_edges"] == [0.0, 2.0, 4.0, 6.0]
    assert corr["error_rate_by_tercile"] == [0.0, 1.0, pytest.approx(1 / 3)]  # {0, 1}, {2, 3}, {4, 5, 6}


@pytest.mark.parametrize("x, wrong, rates", [
    ([0.1, 0.2], [0, 1], None),  # fewer than 3 pairs
    ([0.5] * 3, [0, 1, 1], [None, None, pytest.approx(2 / 3)]),  # no spread in x: every pair in the top tercile
    ([0.1, 0.2, 0.3], [1, 1, 1], [1.0, 1.0, 1.0]),  # no spread in the errors
])
def test_similarity_correlation_is_none_where_undefined(x, wrong, rates):
    pred, ref, pairs = _pairs_with_errors(wrong)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = compute_metrics(pred, ref, pairs, similarity={"d": np.repeat(x, 2).tolist()}, n_bootstrap=0)
    corr = r["similarity_correlation"]["d"]
    assert (corr["n_pairs"], corr["pearson"], corr["spearman"], corr["spearman_p"]) == (len(x), None, None, None)
    assert corr.get("error_rate_by_tercile") == rates


def test_similarity_correlation_with_three_pairs():
    x, wrong = [0.1, 0.2, 0.3], [0, 0, 1]
    pred, ref, pairs = _pairs_with_errors(wrong)
    corr = compute_metrics(pred, ref, pairs, similarity={"d": np.repeat(x, 2).tolist()},
                           n_bootstrap=0)["similarity_correlation"]["d"]
    assert corr["spearman"] == pytest.approx(stats.spearmanr(x, wrong).statistic)
    assert corr["tercile_edges"] == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.1 + 0.4 / 3, 0.3])
