"""The offline demo end to end: real photos, real OCR models, a hub-layout release, a report."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from safetypairs.demo import DemoConfig, run_demo
from safetypairs.utils import OutputDirError, prepare_out_dir

LOAD_WITHOUT_SAFETYPAIRS = textwrap.dedent(
    """
    import json, sys
    from datasets import load_dataset
    pairs = load_dataset(sys.argv[1])
    images = load_dataset(sys.argv[1], "images")
    assert "safetypairs" not in sys.modules
    split = next(iter(pairs))
    p, i = pairs[split], images[split]
    print(json.dumps({
        "split": split, "n_pairs": len(p), "n_images": len(i),
        "label_names": i.features["label"].names, "roles": sorted(set(i.features["role"].int2str(i["role"]))),
        "sizes_match": all(r["unsafe_image"].size == r["safe_image"].size == r["edit_mask"].size for r in p),
        "pair_columns": p.column_names,
    }))
    """
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    summary = run_demo(DemoConfig(out=out, n=4, n_bootstrap=50))
    return out, summary


def test_demo_writes_a_loadable_release(demo_run):
    out, summary = demo_run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SAFETYPAIRS, str(out / "dataset")],
                          capture_output=True, text=True, env=env, cwd=out, check=True)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["n_pairs"] == summary.accepted >= 1
    assert info["n_images"] == 3 * info["n_pairs"]  # original, edited and control per pair
    assert info["label_names"] == ["safe", "unsafe"] and info["roles"] == ["control", "edited", "original"]
    assert info["sizes_match"]
    for column in ("pair_id", "category", "policy", "unsafe_image", "safe_image", "instruction", "source_id",
                   "editor", "seed", "edit_mask", "changed_fraction", "ssim_outside"):
        assert column in info["pair_columns"]
    card = (out / "dataset" / "README.md").read_text()
    assert card.startswith("---") and "configs:" in card


def test_demo_results_account_for_every_row(demo_run):
    out, summary = demo_run
    results = json.loads((out / "results.json").read_text())
    stages = {s["stage"]: s for s in results["stages"]}
    for name in ("instruct", "edit", "validate"):
        assert stages[name]["rows_in"] == stages[name]["rows_out"] == 4
        assert sum(stages[name]["statuses"].values()) == 4
    assert results["accepted_pairs"] + sum(results["reject_reasons"].values()) == 4
    for step in results["funnel"][1:]:  # every row that entered a step and did not leave it has a status
        dropped = sum(v for k, v in step["statuses"].items() if k != "ok")
        assert step["rows_in"] - step["rows_out"] == dropped, step
    assert results["acceptance_rate"] == results["accepted_pairs"] / 4
    assert "ssim" in " ".join(results["metrics_ran"]).lower()
    assert set(results["guards"]) == {"ocr-lexicon", "nudenet"}
    assert results["guards"]["nudenet"]["metrics"]["recall"] == 0.0  # it only sees nudity
    assert "Circular by construction" in results["notes"]["ocr-lexicon"]
    html = (out / "report.html").read_text()
    assert "Circular by construction" in html and "data:image/" in html and "<script src" not in html
    assert "wrote" in summary.render() and "accepted pairs" in summary.render()


def test_demo_training_section_has_three_arms(demo_run):
    out, summary = demo_run
    training = json.loads((out / "results.json").read_text())["training"]
    assert training["encoder"] == "ocr-text:max_side=320" and training["n"]["pairs"] == summary.accepted
    arms = training["summary"]["balanced_accuracy"]["arms"]
    assert set(arms) == {"base", "pairs", "random"} and list(arms["base"]) == [str(k) for k in (1, 2, 4, 8) if k <= summary.accepted]
    assert all(cell["n"] == 5 for arm in arms.values() for cell in arm.values())
    assert (out / "training" / "curve.png").is_file() and (out / "training" / "results.json").is_file()
    html = (out / "report.html").read_text()
    assert "Training: sample efficiency of pairs" in html and "+ k random extra images" in html
    assert "probe (ocr-text:max_side=320) k=2" in summary.render()


def test_output_folder_checks(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(OutputDirError, match="--overwrite"):
        prepare_out_dir(tmp_path / "full", overwrite=False)
    assert (tmp_path / "full" / "x").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputDirError, match="not a folder"):
        prepare_out_dir(tmp_path / "file", overwrite=False)
    with pytest.raises(OutputDirError, match="cannot write"):
        prepare_out_dir(tmp_path / "file" / "sub", overwrite=False)
    prepare_out_dir(tmp_path / "full", overwrite=True)
    assert not any((tmp_path / "full").iterdir())
    with pytest.raises(ValueError, match="at least 1"):
        DemoConfig(out=tmp_path, n=0)
