"""Tests for the evaluate stage, the CLI subcommand and the offline `evaluate` metric folder."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from PIL import Image, ImageDraw
from skimage import data
from tiny_models import build_tiny_open_clip

from safetypairs.cli import main
from safetypairs.evaluate.stage import EvaluateConfig, run_evaluate
from safetypairs.schema import IMAGE_FEATURES, PAIR_FEATURES
from safetypairs.evaluate.scoring import guard_columns

REPO = Path(__file__).resolve().parents[1]


STICKER = (8, 8, 40, 40)  # the "unsafe element": a green box a green-share guard (`slow`) flags


def _role_images(i: int, name: str) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Original, edited and control of pair ``i``: three different pictures.

    The original carries a green sticker (pair 3's does not: a guard looking for green misses it), the edit
    paints it grey (pair 2's edit paints a corner instead: the sticker stays), the control is the original a
    little brighter.
    """
    photo = Image.fromarray(getattr(data, name)()).convert("RGB").resize((64, 64))
    original = photo.copy()
    if i % 4 != 3:
        ImageDraw.Draw(original).rectangle(STICKER, fill=(40, 220, 40))
    edited = original.copy()
    ImageDraw.Draw(edited).rectangle(STICKER if i % 4 != 2 else (48, 48, 63, 63), fill=(128, 128, 128))
    control = original.point(lambda v: min(255, v + 6))
    return original, edited, control


def _rows(n_pairs=4, bad_image=False):
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera"]
    rows = {"image": [], "label": [], "category": [], "pair_id": [], "role": [], "image_id": [], "source_id": [],
            "image_digest": []}
    for i in range(n_pairs):
        images = _role_images(i, names[i % len(names)])
        for image, role, label in zip(images, ("original", "edited", "control"), (1, 0, 1)):
            rows["image"].append(image)
            rows["label"].append(label)
            rows["category"].append(f"O{i % 2 + 1}")
            rows["pair_id"].append(f"p{i}")
            rows["role"].append(role)
            rows["image_id"].append(f"p{i}-{role}")
            rows["source_id"].append(f"s{i}")
            rows["image_digest"].append(None)
    if bad_image:
        rows["image"][1] = {"bytes": b"not an image", "path": None}
    return rows


def _green_share(image: Image.Image) -> float:
    means = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return float(means[1] / means.sum())


def test_role_images_differ_and_a_green_guard_gets_half_the_pairs_right():
    """The fixture can show a bug that mixes up roles: every role has its own pixels and its own verdict."""
    rows = _rows(4)
    digests = {np.asarray(im).tobytes() for im in rows["image"]}
    assert len(digests) == 12
    said_unsafe = [_green_share(im) > 0.36 for im in rows["image"]]  # the `slow` guard's rule
    assert said_unsafe == [True, False, True, True, False, True, True, True, True, False, False, False]


@pytest.fixture(scope="module")
def clip_guard(tmp_path_factory):
    return f"clip-zeroshot:open_clip:{build_tiny_open_clip(tmp_path_factory.mktemp('clip'))}"


def test_config_validation():
    with pytest.raises(ValueError, match="Did you mean 'nudenet'"):
        EvaluateConfig(guards=("nudnet",))
    with pytest.raises(ValueError, match="non-empty"):
        EvaluateConfig(guards=())
    with pytest.raises(ValueError, match="batch_size"):
        EvaluateConfig(guards=("nudenet",), batch_size=0)
    assert EvaluateConfig(guards=("nudenet", "nudenet")).guards == ("nudenet",)


def test_run_evaluate_scores_each_image_as_the_guard_does_and_is_reproducible(clip_guard):
    """Each row's score is the guard's own score of that row's image (roles have different pixels, batches straddle
    pairs), and a fresh load of the tiny model after other torch draws gives the same metrics (seeded weights)."""
    import torch

    from safetypairs.backends.registry import load_backend, unload_backends
    from safetypairs.policy import load_policy

    rows = _rows(bad_image=True)
    dataset = Dataset.from_dict(rows, features=IMAGE_FEATURES)
    config = EvaluateConfig(guards=(clip_guard,), n_bootstrap=50, batch_size=5)
    results = run_evaluate(dataset, config)
    entry = results["guards"][clip_guard]
    assert entry["statuses"] == {"ok": 11, "unreadable": 1}
    metrics = entry["metrics"]
    assert metrics["n"] == 8 and metrics["n_unknown"] == 1 and metrics["control"]["n"] == 4
    assert set(metrics["per_category"]) == {"O1", "O2"}
    assert results["leaderboard"][0]["guard"] == clip_guard
    predictions = results["predictions"][clip_guard]
    assert predictions["pred"][1] == "unknown" and predictions["score"][1] is None
    guard, policy = load_backend("guards", clip_guard, "cpu"), load_policy("llavaguard")
    for i, (image, category) in enumerate(zip(rows["image"], rows["category"])):
        if i != 1:
            (alone,) = guard.classify([image], [category], policy)
            assert predictions["pred"][i] == alone.label and predictions["score"][i] == pytest.approx(alone.score, abs=1e-6)
    assert len({round(v, 6) for v in predictions["score"] if v is not None}) == 11  # every image its own score
    unload_backends()  # a fresh load, after other draws from the torch RNG: the same weights
    torch.manual_seed(12345)
    torch.rand(1000)
    again = run_evaluate(dataset, config)
    assert again["guards"][clip_guard]["metrics"] == metrics
    json.dumps(results)  # results.json-ready


def test_guard_columns_are_distinct_and_stable():
    a, b = guard_columns("hf-vlm:org/model"), guard_columns("hf-vlm:org_model")
    assert a["pred"] != b["pred"] and a == guard_columns("hf-vlm:org/model")


def _write_release(folder: Path):
    rows = _rows(3)
    images = Dataset.from_dict(rows, features=IMAGE_FEATURES)
    pair_rows = {name: [] for name in PAIR_FEATURES}
    for i in range(3):
        mask = Image.new("L", (64, 64), 0)
        values = {"pair_id": f"p{i}", "category": f"O{i % 2 + 1}", "policy": "llavaguard@1.0",
                  "unsafe_image": rows["image"][3 * i], "safe_image": rows["image"][3 * i + 1],
                  "control_image": rows["image"][3 * i + 2], "edit_mask": mask, "seed": 0,
                  "changed_fraction": 0.1 * i, "instruction": "replace the caption"}
        for name in PAIR_FEATURES:
            pair_rows[name].append(values.get(name))
    pairs = Dataset.from_dict(pair_rows, features=PAIR_FEATURES)
    (folder / "data").mkdir(parents=True)
    images.to_parquet(str(folder / "data" / "images-test.parquet"))
    pairs.to_parquet(str(folder / "data" / "pairs-test.parquet"))
    (folder / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: pairs
          default: true
          data_files:
          - split: test
            path: data/pairs-test.parquet
        - config_name: images
          data_files:
          - split: test
            path: data/images-test.parquet
        ---
        """))


def test_cli_evaluate_writes_results_and_report(tmp_path, clip_guard, capsys):
    _write_release(tmp_path / "release")
    out = tmp_path / "run1"
    code = main(["-q", "evaluate", "--dataset", str(tmp_path / "release"), "--guard", clip_guard,
                 "--out", str(out), "--bootstrap", "20"])
    assert code == 0 and clip_guard in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["n_rows"] == 9
    assert results["dataset"]["split"] == "test"  # the split used, also when none was asked for
    assert "changed_fraction" in results["guards"][clip_guard]["metrics"]["similarity_correlation"]
    html = (out / "report.html").read_text()
    assert "Leaderboard" in html and "data:image/" in html
    assert (out / "predictions.parquet").stat().st_size > 0
    assert main(["-q", "evaluate", "--dataset", str(tmp_path), "--guard", "nudnet", "--out", str(out)]) == 2


def test_evaluate_metric_folder_loads_offline_in_subprocess():
    kwargs = dict(predictions=["unsafe", "safe", "safe", "unknown", "unsafe", "safe"],
                  references=["unsafe", "safe", "unsafe", "safe", "unsafe", "safe"],
                  pair_ids=["a", "a", "b", "b", "c", "c"], categories=["O1", "O1", "O2", "O2", "O1", "O1"],
                  scores=[0.9, 0.2, 0.4, None, 0.7, 0.1], n_bootstrap=100)
    script = textwrap.dedent(f"""
        import json, sys, evaluate
        metric = evaluate.load({str(REPO / "metrics" / "safetypairs")!r})
        json.dump(metric.compute(**json.loads(sys.argv[1])), sys.stdout)
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetypairs.evaluate.metrics import compute_metrics

    expected = json.loads(json.dumps(compute_metrics(**kwargs)))
    assert json.loads(proc.stdout) == expected
    assert np.isclose(expected["pair_accuracy"], 2 / 3)


def test_leaderboard_puts_undefined_after_zero():
    from safetypairs.evaluate.scoring import leaderboard

    guards = {name: {"metrics": {"pair_accuracy": pa, "f1": f1}}
              for name, pa, f1 in [("none", None, None), ("zero", 0.0, 0.0), ("half", 0.5, 0.2), ("half-better-f1", 0.5, 0.9)]}
    assert [row["guard"] for row in leaderboard(guards)] == ["half-better-f1", "half", "zero", "none"]


def test_evaluate_shards_and_resumes_like_one_process(tmp_path):
    """SIGKILL after the first chunk + restart == uninterrupted == another chunk size == 2 processes."""
    from slow_backends import check_sharding_and_resume

    from safetypairs.engine.datafiles import write_parquet

    release = tmp_path / "release"
    (release / "data" / "images").mkdir(parents=True)
    write_parquet(Dataset.from_dict(_rows(4), features=IMAGE_FEATURES), release / "data" / "images" / "test-0.parquet")
    (release / "README.md").write_text("---\nconfigs:\n- config_name: images\n  data_files:\n  - split: test\n"
                                       "    path: data/images/test-*.parquet\n---\n")

    def args(out, chunk_size):
        return ["evaluate", "--dataset", str(tmp_path / "release"), "--guard", "slow", "--device", "cpu",
                "--bootstrap", "20", "--out", str(out), "--chunk-size", str(chunk_size), "--batch-size", "2"]

    def table(out):
        results = json.loads((out / "results.json").read_text())
        metrics = results["guards"]["slow"]["metrics"]
        assert results["n_images"] == 12
        assert metrics["pair_accuracy"] == 0.5  # p0, p1 right; p2's edit keeps the green sticker; p3's original lacks it
        assert metrics["control"]["unsafe_rate"] == 0.75 and metrics["confusion"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
        return pq.read_table(out / "predictions.parquet")

    check_sharding_and_resume(args, tmp_path, table)


class FussyGuard:
    """Unsafe when the image is mostly red; raises on a mostly blue image (a guard crash on one input)."""

    OPTIONS: dict = {}
    calls = 0

    @classmethod
    def from_spec(cls, arg, device="cpu", **options):
        return cls()

    def classify(self, images, categories, policy):
        from safetypairs.backends.base import Verdict

        FussyGuard.calls += 1
        verdicts = []
        for im in images:
            r, g, b = np.asarray(im.convert("RGB"), dtype=float).mean(axis=(0, 1))
            if b > 200:
                raise RuntimeError("guard crashed on a blue image")
            verdicts.append(Verdict("unsafe" if r > 200 else "safe", float(r > 200), f"mean red {r:.0f}", ""))
        return verdicts


def test_a_guard_that_raises_marks_only_its_rows(isolated_registry):
    isolated_registry.register("guards", "fussy-test", f"{__name__}:FussyGuard")
    colours = [(255, 0, 0), (0, 0, 255), (255, 0, 0), (0, 255, 0)]  # original, edited of p0, p1
    rows = {"image": [Image.new("RGB", (32, 32), c) for c in colours], "label": [1, 0, 1, 0],
            "category": ["O1"] * 4, "pair_id": ["p0", "p0", "p1", "p1"], "role": ["original", "edited"] * 2,
            "image_id": ["p0-original", "p0-edited", "p1-original", "p1-edited"], "source_id": ["s0", "s0", "s1", "s1"],
            "image_digest": [None] * 4}
    dataset = Dataset.from_dict(rows, features=IMAGE_FEATURES)
    FussyGuard.calls = 0
    results = run_evaluate(dataset, EvaluateConfig(guards=("fussy-test",), n_bootstrap=0, batch_size=4))
    assert FussyGuard.calls == 5  # the batch of 4, then each image alone
    entry, preds = results["guards"]["fussy-test"], results["predictions"]["fussy-test"]
    assert entry["statuses"] == {"ok": 3, "guard_error": 1}
    assert preds["pred"] == ["unsafe", "unknown", "unsafe", "safe"]
    assert preds["rationale"][1] == ("image 'p0' (edited): guard fussy-test failed: "
                                     "RuntimeError: guard crashed on a blue image")
    assert entry["metrics"]["n_unknown"] == 1 and entry["metrics"]["pair_accuracy"] == 0.5


def test_evaluate_metric_takes_ints_numpy_arrays_and_bools():
    """The images config's own ClassLabel ints, numpy arrays and booleans score like the strings."""
    import evaluate

    from safetypairs.evaluate.metrics import compute_metrics

    metric = evaluate.load(str(REPO / "metrics" / "safetypairs"))
    refs = [1, 0, 1, 1, 0, 1]  # original, edited, control of two pairs
    preds = [1, 1, 1, 1, 0, 0]
    pairs, roles = ["a", "a", "a", "b", "b", "b"], [0, 1, 2, 0, 1, 2]
    expected = compute_metrics(["unsafe" if p else "safe" for p in preds], ["unsafe" if r else "safe" for r in refs],
                               pairs, roles=["original", "edited", "control"] * 2, n_bootstrap=50)
    for p, r in [(preds, refs), (np.array(preds), np.array(refs)), ([bool(v) for v in preds], np.array(refs, bool))]:
        got = metric.compute(predictions=p, references=r, pair_ids=np.array(pairs), roles=np.array(roles),
                             n_bootstrap=50)
        assert got == expected
    assert expected["control"]["n"] == 2 and expected["n"] == 4
    assert expected["accuracy"] == 0.75 and expected["pair_accuracy"] == 0.5  # a's edit called unsafe; b right


class ChannelGuard:
    """Unsafe when its colour channel's share of the image is above a third; counts the images it sees, and on each
    load how many of these guards the registry still holds alive."""

    OPTIONS: dict = {}
    CHANNEL = 1
    seen: dict[str, int] = {}
    alive_at_load: list[int] = []
    stop_after = None  # raise KeyboardInterrupt (a kill) once this many images were seen in all

    @classmethod
    def from_spec(cls, arg, device="cpu", **options):
        import gc

        from safetypairs.backends.registry import loaded_backends

        gc.collect()
        ChannelGuard.alive_at_load.append(sum(isinstance(b, ChannelGuard) for _, _, b in loaded_backends()))
        return cls()

    def classify(self, images, categories, policy):
        from safetypairs.backends.base import Verdict

        name = type(self).__name__
        if ChannelGuard.stop_after is not None and sum(ChannelGuard.seen.values()) >= ChannelGuard.stop_after:
            raise KeyboardInterrupt("killed mid-guard")
        ChannelGuard.seen[name] = ChannelGuard.seen.get(name, 0) + len(images)
        shares = [float(np.asarray(im.convert("RGB"), dtype=float).mean(axis=(0, 1))[self.CHANNEL]) for im in images]
        totals = [float(np.asarray(im.convert("RGB"), dtype=float).mean(axis=(0, 1)).sum()) for im in images]
        return [Verdict("unsafe" if s / t > 0.36 else "safe", s / t, "channel share", "") for s, t in zip(shares, totals)]


class GreenGuard(ChannelGuard):
    CHANNEL = 1


class RedGuard(ChannelGuard):
    CHANNEL = 0


@pytest.fixture
def two_guards(isolated_registry, tmp_path):
    """A 12-image release and two in-process guards (``green-test``, ``red-test``), their counters reset."""
    from safetypairs.engine.datafiles import write_parquet

    isolated_registry.register("guards", "green-test", f"{__name__}:GreenGuard")
    isolated_registry.register("guards", "red-test", f"{__name__}:RedGuard")
    release = tmp_path / "release"
    (release / "data" / "images").mkdir(parents=True)
    write_parquet(Dataset.from_dict(_rows(4), features=IMAGE_FEATURES), release / "data" / "images" / "test-0.parquet")
    (release / "README.md").write_text("---\nconfigs:\n- config_name: images\n  data_files:\n  - split: test\n"
                                       "    path: data/images/test-*.parquet\n---\n")
    ChannelGuard.seen, ChannelGuard.alive_at_load, ChannelGuard.stop_after = {}, [], None
    return release


def _evaluate(release, out, order):
    from safetypairs.engine.runner import RunConfig
    from safetypairs.evaluate.stage import evaluate_run

    config = EvaluateConfig(guards=("green-test", "red-test"), n_bootstrap=20, batch_size=2, device="cpu", order=order)
    return evaluate_run(str(release), config, RunConfig(out, chunk_size=4))


def _metrics(results):
    return {spec: entry["metrics"] for spec, entry in results["guards"].items()}


def test_guard_major_gives_chunk_majors_numbers_with_one_guard_in_memory_at_a_time(two_guards, tmp_path):
    from safetypairs.backends import registry

    by_chunk = _evaluate(two_guards, tmp_path / "chunk", "chunk")
    assert ChannelGuard.alive_at_load == [0, 1]  # the second guard loads beside the first
    registry.unload_backends()
    ChannelGuard.alive_at_load = []
    by_guard = _evaluate(two_guards, tmp_path / "guard", "guard")
    assert ChannelGuard.alive_at_load == [0, 0]  # the first was gone before the second loaded
    assert _metrics(by_guard) == _metrics(by_chunk) and by_guard["leaderboard"] == by_chunk["leaderboard"]
    assert _metrics(by_guard)["green-test"]["pair_accuracy"] == 0.5
    assert pq.read_table(tmp_path / "guard" / "predictions.parquet").equals(
        pq.read_table(tmp_path / "chunk" / "predictions.parquet"))
    assert json.loads((tmp_path / "guard" / "run.json").read_text())["guard_order"] == "guard"
    assert json.loads((tmp_path / "chunk" / "run.json").read_text())["guard_order"] == "chunk"


def test_guard_major_killed_mid_guard_resumes_without_redoing_finished_pieces(two_guards, tmp_path):
    from safetypairs.backends import registry

    ChannelGuard.stop_after = 12 + 4  # every image by green-test, then red-test's first chunk (4 images)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(two_guards, tmp_path / "eval", "guard")
    assert ChannelGuard.seen == {"GreenGuard": 12, "RedGuard": 4}
    registry.unload_backends()
    ChannelGuard.seen, ChannelGuard.stop_after = {}, None
    resumed = _evaluate(two_guards, tmp_path / "eval", "guard")
    assert ChannelGuard.seen == {"RedGuard": 8}  # green-test finished; red-test's first chunk kept
    run = json.loads((tmp_path / "eval" / "run.json").read_text())
    assert run["statuses"]["green-test"] == {"ok": 12} and run["statuses"]["red-test"] == {"ok": 12}
    registry.unload_backends()
    whole = _evaluate(two_guards, tmp_path / "whole", "chunk")
    assert _metrics(resumed) == _metrics(whole)


def test_auto_order_is_guard_major_for_several_in_process_guards_on_a_gpu_only(two_guards, monkeypatch):
    from safetypairs.backends.served import ServedModel
    from safetypairs.evaluate.stage import guard_order

    monkeypatch.setattr(ServedModel, "check_ready", classmethod(lambda cls, model, **options: None))  # no server

    def order(guards, device):
        return guard_order(EvaluateConfig(guards=guards, n_bootstrap=0, device=device))

    assert order(("green-test", "red-test"), "cuda:0") == "guard"
    assert order(("green-test", "red-test"), "cpu") == "chunk"
    assert order(("green-test",), "cuda") == "chunk"
    assert order(("green-test", "openai:m,base_url=http://127.0.0.1:9/v1"), "cuda") == "chunk"  # served: no memory
    with pytest.raises(ValueError, match="order must be one of chunk, guard, auto"):
        EvaluateConfig(guards=("green-test",), order="rows")
