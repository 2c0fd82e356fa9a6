"""Linear probes: C selection, safetensors round trip, the linear-probe guard through evaluate."""

import json

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value
from tiny_models import build_tiny_open_clip

from safetypairs import schema as S
from safetypairs.backends.probe import (
    LinearProbe,
    LinearProbeGuard,
    load_probe,
    save_probe,
)
from safetypairs.probes.embed import EmbedConfig, run_embed
from safetypairs.evaluate.stage import EvaluateConfig, run_evaluate
from safetypairs.probes.probe import (
    ProbeConfig,
    embedded_arrays,
    fit_probe,
    train_probe,
    validation_split,
)
from safetypairs.backends.registry import build_backend, load_backend
from safetypairs.evaluate.scoring import guard_columns
from safetypairs.sources import DEMO_PHOTOS, demo_photo

IMAGES = Features({"image": Image(), "label": ClassLabel(names=S.LABELS), "category": Value("string"),
                   "pair_id": Value("string"), "role": Value("string")})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return f"open_clip:{build_tiny_open_clip(tmp_path_factory.mktemp('clip'))}"


def _images(n_pairs: int = 6) -> Dataset:
    rows = {name: [] for name in IMAGES}
    for i in range(n_pairs):
        photo = demo_photo(DEMO_PHOTOS[i % len(DEMO_PHOTOS)]).resize((40, 40))
        for role, label, image in (("original", 1, photo), ("edited", 0, photo.rotate(90)), ("control", 1, photo)):
            rows["image"].append(image)
            rows["label"].append(label)
            rows["category"].append("O1")
            rows["pair_id"].append(f"p{i}")
            rows["role"].append(role)
    return Dataset.from_dict(rows, features=IMAGES)


def _separable(seed=0, n=60, d=8):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d))
    x[:, 0] += 3 * (2 * y - 1)
    return x, y


def test_fit_probe_chooses_c_on_a_grouped_validation_split():
    x, y = _separable()
    probe = fit_probe(x, y, ProbeConfig("ocr-text", c_grid=(0.001, 1.0)))
    assert probe.meta["C"] == 1.0 and probe.meta["C_selection"].startswith("validation split")
    assert probe.meta["val_balanced_accuracy"]["1.0"] >= probe.meta["val_balanced_accuracy"]["0.001"]
    assert np.mean((probe.predict_proba(x) >= 0.5) == y) > 0.95
    assert probe.meta["n_unsafe"] == 30 and probe.meta["n_safe"] == 30
    assert 0 < probe.threshold < 1 and probe.meta["threshold"] == probe.threshold
    tiny = fit_probe(x[:2], y[:2], ProbeConfig("ocr-text"))  # one per class: nothing to hold out
    assert tiny.meta["C"] == 1.0 and tiny.meta["C_selection"].startswith("default") and tiny.threshold == 0.5
    with pytest.raises(ValueError, match="safe and unsafe"):
        fit_probe(x[y == 1], y[y == 1], ProbeConfig("ocr-text"))


def test_validation_split_keeps_groups_together():
    y = np.array([1, 0] * 10)
    groups = np.repeat(np.arange(10), 2)
    train, val = validation_split(y, groups, 0.3, np.random.default_rng(0))
    assert not set(groups[train]) & set(groups[val]) and len(set(groups[val])) == 3
    assert validation_split(np.array([1, 0]), np.array([0, 0]), 0.5, np.random.default_rng(0)) is None


def test_save_load_round_trip(tmp_path):
    x, y = _separable(d=5)
    probe = fit_probe(x, y, ProbeConfig("ocr-text:dim=5"))
    folder = save_probe(probe, tmp_path / "p")
    config = json.loads((folder / "probe.json").read_text())
    assert config["encoder"] == "ocr-text:dim=5" and config["dim"] == 5 and config["classes"] == ["safe", "unsafe"]
    loaded = load_probe(folder)
    np.testing.assert_allclose(loaded.predict_proba(x), probe.predict_proba(x), rtol=1e-5)
    assert loaded.meta["C"] == probe.meta["C"] and loaded.threshold == probe.threshold
    with pytest.raises(ValueError, match="expects embeddings of size 5"):
        loaded.predict_proba(np.zeros((1, 4)))
    (folder / "probe.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="probe.safetensors is missing"):
        load_probe(folder)


def test_guard_spec_options(tmp_path, tiny_clip):
    save_probe(LinearProbe(np.zeros(32, np.float32), 0.0, tiny_clip), tmp_path / "p")
    guard = load_backend("guards", f"linear-probe:{tmp_path / 'p'},threshold=0.7")
    assert isinstance(guard, LinearProbeGuard) and guard.threshold == 0.7
    save_probe(LinearProbe(np.zeros(32, np.float32), 0.0, tiny_clip, threshold=0.3), tmp_path / "q")
    assert load_backend("guards", f"linear-probe:{tmp_path / 'q'}").threshold == 0.3  # the probe's own cut
    with pytest.raises(ValueError, match="allowed: threshold"):
        build_backend("guards", f"linear-probe:{tmp_path / 'p'},thresh=1")
    with pytest.raises(ValueError, match=r"linear-probe option value\(s\): threshold=2.0 \(allowed: \[0, 1\]\)"):
        build_backend("guards", f"linear-probe:{tmp_path / 'p'},threshold=2")
    with pytest.raises(ValueError, match="linear-probe needs <probe folder> after 'linear-probe:'"):
        build_backend("guards", "linear-probe")
    assert build_backend("guards", f"linear-probe:{tmp_path / 'q'},threshold=none").threshold == 0.3  # unset


def test_trained_probe_is_scored_by_evaluate_like_any_guard(tmp_path, tiny_clip):
    images = _images()
    embedded, _ = run_embed(images, EmbedConfig(encoder=tiny_clip, device="cpu"))
    train = embedded.filter(lambda r: r != "control", input_columns="role")
    probe = train_probe(train, ProbeConfig(tiny_clip), tmp_path / "probe")
    assert probe.meta["n_train"] == 12
    spec = f"linear-probe:{tmp_path / 'probe'}"
    results = run_evaluate(images, EvaluateConfig(guards=(spec,), n_bootstrap=20, device="cpu"))
    scores = np.array(results["predictions"][spec]["score"])
    x, _, _ = embedded_arrays(embedded, "all")
    np.testing.assert_allclose(scores, load_probe(tmp_path / "probe").predict_proba(x), rtol=1e-4, atol=1e-6)
    threshold = load_probe(tmp_path / "probe").threshold
    assert threshold == probe.meta["threshold"]  # the guard applies the cut the probe chose on validation
    assert results["predictions"][spec]["pred"] == ["unsafe" if s >= threshold else "safe" for s in scores]
    assert results["guards"][spec]["metrics"]["auroc"] is not None
    assert guard_columns(spec)["score"]


def test_train_probe_adds_the_pairs_originals_and_edits(tmp_path, tiny_clip):
    images = _images(4)
    base, _ = run_embed(images.filter(lambda r: r == "original", input_columns="role"), EmbedConfig(tiny_clip))
    base = Dataset.from_dict({"embedding": list(base["embedding"]) * 2, "label": [1] * 4 + [0] * 4,
                              "source_id": [f"n{i}" for i in range(8)]})
    probe = train_probe(base, ProbeConfig(tiny_clip), tmp_path / "p", pairs=images, embed=EmbedConfig(tiny_clip))
    assert probe.meta["n_train"] == 8 + 8 and probe.meta["n_pairs_images"] == 8  # controls left out
    assert probe.meta["n_groups"] == 8 + 4  # a pair's two images are one group


def test_train_rows_that_are_pair_images_join_their_pair_in_the_validation_split(tmp_path, tiny_clip):
    """Natural training rows named by file that hold a pair's original: one group with that pair, so C and the
    threshold are never chosen on a copy of a training image."""
    images = _images(4)
    originals = images.filter(lambda r: r == "original", input_columns="role")
    natural = Dataset.from_dict({"image": list(originals["image"]) + [demo_photo("moon").resize((40, 40))] * 1,
                                 "label": [1, 1, 1, 1, 0], "source_id": [f"photos/{i}.png" for i in range(5)]})
    probe = train_probe(natural, ProbeConfig(tiny_clip), tmp_path / "p", pairs=images, embed=EmbedConfig(tiny_clip))
    assert probe.meta["n_groups"] == 4 + 1  # 4 pair groups (each with its natural copy) + the moon


def test_choose_threshold_hand_computed():
    from safetypairs.probes.probe import choose_threshold

    # cuts 0.05, 0.35, 0.65, 0.8, 0.95 give balanced accuracy 0.5, 0.75, 1.0, 0.75, 0.5
    assert choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9])) == pytest.approx(0.65)
    assert choose_threshold(np.array([0, 1]), np.array([0.2, 0.8])) == pytest.approx(0.5)
    # a probe that ranks perfectly but scores everything high: the cut moves up, not 0.5
    assert choose_threshold(np.array([0, 0, 1, 1]), np.array([0.8, 0.85, 0.95, 0.99])) == pytest.approx(0.9)
