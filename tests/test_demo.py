"""The offline demo end to end: the built-in recipe `demo` built with real photos and real OCR models, a hub-layout
release, the training section and a report."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from safetypairs.cli import main
from safetypairs.demo import DemoConfig

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


class Summary:
    """What `safetypairs demo` printed, and its accepted pair count (from results.json)."""

    def __init__(self, printed: str, accepted: int) -> None:
        self.printed, self.accepted = printed, accepted

    def render(self) -> str:
        return self.printed


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("demo") / "out"
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["-q", "demo", "--out", str(out), "--n", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    return out, Summary(printed.getvalue(), results["accepted_pairs"])


def test_demo_writes_a_loadable_release(demo_run):
    out, summary = demo_run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SAFETYPAIRS, str(out / "release")],
                          capture_output=True, text=True, env=env, cwd=out, check=True)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["n_pairs"] == summary.accepted >= 1
    assert info["n_images"] == 3 * info["n_pairs"]  # original, edited and control per pair
    assert info["label_names"] == ["safe", "unsafe"] and info["roles"] == ["control", "edited", "original"]
    assert info["sizes_match"]
    for column in ("pair_id", "category", "policy", "unsafe_image", "safe_image", "instruction", "source_id",
                   "editor", "seed", "edit_mask", "changed_fraction", "ssim_outside"):
        assert column in info["pair_columns"]
    card = (out / "release" / "README.md").read_text()
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


def test_demo_training_section_has_four_arms_and_the_two_effects(demo_run):
    out, summary = demo_run
    training = json.loads((out / "results.json").read_text())["training"]
    assert training["encoder"] == "ocr-text:max_side=320" and training["n"]["pairs"] == summary.accepted
    arms = training["summary"]["balanced_accuracy"]["arms"]
    ks = [str(k) for k in (1, 2, 4, 8) if 2 * k <= summary.accepted]  # the unpaired arm needs 2k pairs
    assert set(arms) == {"base", "pairs", "unpaired", "random"} and list(arms["base"]) == ks
    assert all(cell["n"] == 10 for arm in arms.values() for cell in arm.values())
    effects = training["summary"]["auroc"]["effects"]
    assert set(effects) >= {"pair_structure", "more_data"} and list(effects["pair_structure"]) == ks
    assert training["eval_exclusion"]["excluded"] == {} and training["n"]["eval_sources"] == 6
    assert (out / "training" / "curve.png").is_file() and (out / "training" / "results.json").is_file()
    html = (out / "report.html").read_text()
    assert "Training: sample efficiency of pairs" in html and "+ 2k random images" in html and "pair structure" in html
    assert "probe (ocr-text:max_side=320) k=1: balanced accuracy, pair structure (pairs - unpaired)" in summary.render()


def test_demo_eval_images_share_no_photo_and_no_caption_with_training():
    """The eval set's photos and caption strings appear nowhere in the sources, the edits or the base set."""
    from safetypairs.demo import DEMO_EVAL_PER_CLASS, _captioned_rows
    from safetypairs.instructions import demo_text
    from safetypairs.sources import DEMO_PHOTOS, HELDOUT_PHOTOS

    text = demo_text()
    training_strings = set(text["harassing"]) | set(text["benign"])  # sources, edits (benign phrases), base
    heldout_strings = set(text["heldout_harassing"]) | set(text["heldout_benign"])
    assert not training_strings & heldout_strings and not set(DEMO_PHOTOS) & set(HELDOUT_PHOTOS)
    evaluation = _captioned_rows(DEMO_EVAL_PER_CLASS, 2, "benign", "train-eval", heldout=True)
    assert {s.removeprefix("train-eval-") for s in evaluation["source_id"]} <= set(HELDOUT_PHOTOS)
    assert len(set(evaluation["source_id"])) == 6 and evaluation["label"].count(1) == DEMO_EVAL_PER_CLASS


def test_output_folder_checks_come_before_any_work(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "full"), "--n", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "file"), "--n", "1"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "file" / "sub"), "--n", "1"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]  # nothing half-written
    with pytest.raises(ValueError, match="at least 1"):
        DemoConfig(out=tmp_path, n=0)


def test_a_second_demo_in_its_folder_reuses_every_finished_stage(demo_run, capsys):
    """The demo is a build: run again in its folder, every stage is reused and the numbers are the same."""
    out, _ = demo_run
    before = json.loads((out / "results.json").read_text())
    runs = {stage: (out / stage / "run.json").read_text() for stage in ("generate", "validate", "evaluate")}
    assert main(["-q", "demo", "--out", str(out), "--n", "4"]) == 0
    assert {stage: (out / stage / "run.json").read_text() for stage in runs} == runs  # nothing ran again
    after = json.loads((out / "results.json").read_text())
    assert after["funnel"] == before["funnel"] and after["leaderboard"] == before["leaderboard"]
    assert after["training"]["summary"] == before["training"]["summary"]  # the probes are seeded


def test_every_stage_gives_the_rows_it_gave_before_the_house_was_reshaped():
    """Row content of source, instruct, edit, validate and the release configs on the demo (n=4) equals the
    golden digests written before the reshaping (`tests/demo_rows.py`); only columns named new are left out."""
    from pathlib import Path

    from demo_rows import stage_digests

    golden = json.loads((Path(__file__).parent / "data" / "demo_rows.json").read_text())
    now = stage_digests()
    assert set(now) == set(golden)
    for stage, expected in golden.items():
        assert now[stage]["rows"] == expected["rows"], stage
        assert set(expected["columns"]) <= set(now[stage]["columns"]), stage
        assert now[stage]["digest"] == expected["digest"], f"{stage}: rows changed"


def test_every_status_the_demo_writes_is_a_word_of_the_vocabulary(demo_run):
    from safetypairs import statuses as ST

    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    words = [k for stage in results["stages"] if stage["stage"] in ("instruct", "edit", "validate")
             for k in stage["statuses"]]
    words += [k for step in results["funnel"] for k in step["statuses"]] + list(results["reject_reasons"])
    words += [k for guard in results["guards"].values() for k in guard["statuses"]]
    assert words and not [w for w in words if not ST.is_known(w)]
