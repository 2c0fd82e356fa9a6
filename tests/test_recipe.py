"""Recipes: the file, its checks, the plan, and `safetypairs build` on the demo recipe (one build, reused)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from safetypairs import recipe as R
from safetypairs.cli import main
from safetypairs.cli.build import _argv, stage_schema

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "demo_rows.json").read_text())  # `safetypairs demo` rows, n=4, seed 0


def _recipe_file(tmp_path, name="demo4.yaml", **changes):
    """recipes/demo.yaml at the golden file's size (demo:4) with fewer bootstrap resamples, and ``changes``
    (``stage.field`` -> value)."""
    data = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    data["generate"]["source"] = "demo:4"
    data["evaluate"]["bootstrap"] = 50
    for where, value in changes.items():
        stage, field = where.split(".")
        data.setdefault(stage, {})[field] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _plan(capsys, *argv):
    """The (stage, action) pairs a ``--dry-run`` prints."""
    assert main(["build", *argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    return [tuple(line.split()[:2]) for line in lines]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    recipe = _recipe_file(root)
    assert main(["-q", "build", str(recipe), "--out", str(root / "out")]) == 0
    return recipe, root / "out"


def test_every_shipped_recipe_round_trips_through_resolve_and_dump():
    schema = stage_schema()
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        resolved = R.resolve(R.load(path, schema), schema)
        again = R.from_mapping(yaml.safe_load(R.dump(resolved)), schema)
        assert again == resolved and R.resolve(again, schema) == resolved, path.name
    demo = R.resolve(R.load("demo", schema), schema)
    # defaults as `safetypairs generate --help` / `evaluate --help` state them
    assert demo.stages["generate"]["candidates"] == 1 and demo.stages["generate"]["chunk_size"] == 64
    assert demo.stages["generate"]["control"] is True and demo.stages["generate"]["policy"] == "llavaguard"
    assert demo.stages["validate"]["thresholds"] is None and demo.stages["validate"]["size_mismatch"] == "reject"
    assert demo.stages["evaluate"]["guard"] == ["ocr-lexicon", "nudenet"] and demo.stages["evaluate"]["bootstrap"] == 1000
    assert set(demo.stages) == {"generate", "validate", "release", "evaluate"}
    schema_json = R.json_schema(schema)
    assert schema_json["properties"]["generate"]["properties"]["candidates"]["type"] == ["integer", "null"]
    assert "out" not in schema_json["properties"]["validate"]["properties"]


def test_an_option_added_to_a_command_is_a_recipe_field_without_a_second_declaration(monkeypatch):
    """A flag another developer adds to `generate` (here --editor-batch-size) is a recipe field and reaches argv."""
    from safetypairs.cli import build, pipeline

    def add_generate(sub):
        pipeline.add_generate(sub)
        sub.choices["generate"].add_argument("--editor-batch-size", type=int, default=1)

    monkeypatch.setattr(build, "STAGE_COMMANDS",
                        tuple(add_generate if f is pipeline.add_generate else f for f in build.STAGE_COMMANDS))
    schema = stage_schema()
    recipe = R.from_mapping({"generate": {"source": "demo:2", "editor_batch_size": 3}}, schema)
    fields = {f.name: f for f in schema["generate"]}
    assert _argv("generate", recipe.stages["generate"], fields, Path("o"))[-2:] == ["--editor-batch-size", "3"]
    with pytest.raises(R.RecipeError, match=r"generate.editor_batch_size must be an integer"):
        R.from_mapping({"generate": {"source": "demo:2", "editor_batch_size": "3"}}, schema)


def test_each_stage_reads_the_folder_of_the_stage_before_it(capsys):
    """The build's words for each stage: its --out under the build folder, its input the previous stage's folder, a
    sample-efficiency section's --pairs the release; --print-schema prints the schema the recipe is checked with."""
    schema = stage_schema()
    recipe = R.resolve(R.from_mapping({
        "generate": {"source": "demo:2"}, "validate": {"judge": "ocr-lexicon"}, "release": {"push": "me/x"},
        "evaluate": {"guard": ["nudenet"]},
        "sample-efficiency": {"base": "b", "eval": "e", "encoder": "ocr-text", "k": "1,2"}}, schema), schema)
    words = {stage: _argv(stage, recipe.stages[stage], {f.name: f for f in schema[stage]}, Path("B"))
             for stage in R.STAGES}
    assert words["validate"][:5] == ["validate", "--out", "B/validate", "--overwrite", "B/generate"]
    assert words["release"][:5] == ["release", "--out", "B/release", "--overwrite", "B/validate"]
    assert "--push" not in words["release"]  # uploaded by the build once the card carries the recipe
    assert words["evaluate"][4:6] == ["--dataset", "B/release"] and words["evaluate"].count("--guard") == 1
    assert words["sample-efficiency"][4:6] == ["--pairs", "B/release"] and "--k" in words["sample-efficiency"]
    assert [s.stage for s in R.plan(recipe, "nowhere")] == list(R.STAGES)
    assert main(["build", "--print-schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["properties"]["sample-efficiency"]["required"] == ["base", "eval", "encoder"]


@pytest.mark.parametrize("text, says", [
    ("generate:\n  source: demo:2\n  edtor: ocr-inpaint\n", "unknown field generate.edtor; did you mean 'editor'?"),
    ("generat:\n  source: demo:2\n", "unknown field 'generat'; did you mean 'generate'?"),
    ("generate:\n  source: demo:2\n  candidates: two\n", "generate.candidates must be an integer (--candidates)"),
    ("generate:\n  source: demo:2\n  control: yes please\n", "generate.control must be true or false (--control)"),
    ("generate:\n  source: demo:2\n  editor: diffusers\n", "generate.editor: diffusers needs"),
    ("validate:\n  thresholds: pixel-exact\n", "validate reads the folder generate writes; the recipe needs a generate"),
    ("generate:\n  source: no_such_folder\n", "recipe generate: --source 'no_such_folder' is not a file or folder"),
    ("generate:\n  editor: ocr-inpaint\n", "generate.source is required"),
    ("generate:\n  source: demo:2\n  out: elsewhere\n", "generate.out is set by the build"),
], ids=["field", "stage", "int", "bool", "model-id", "no-source-stage", "missing-source", "required", "managed"])
def test_bad_recipes_fail_in_one_line_before_anything_runs(text, says, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = main(["build", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    assert main(["build", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "recipe" in capsys.readouterr().err


def test_shipped_recipes_plan(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _plan(capsys, "demo", "--out", "o") == [("generate", "run"), ("validate", "run"), ("release", "run"),
                                                   ("evaluate", "run")]
    assert _plan(capsys, str(ROOT / "recipes" / "paper.yaml"), "--out", "o") == [
        ("generate", "run"), ("validate", "run"), ("review", "gate"), ("release", "run"), ("evaluate", "run")]
    paper = yaml.safe_load((ROOT / "recipes" / "paper.yaml").read_text())
    assert paper["validate"]["thresholds"] == "latent-diffusion" and paper["release"]["require_review"] is True
    assert paper["generate"]["editor"].startswith("diffusers:") and paper["generate"]["candidates"] > 1
    assert [g.split(":")[0] for g in paper["evaluate"]["guard"]] == ["llavaguard", "shieldgemma2"]
    assert main(["build", "your-data", "--out", "o", "--dry-run"]) == 2  # its my_data folder is not here
    assert "my_data" in capsys.readouterr().err
    (tmp_path / "my_data").mkdir()
    assert _plan(capsys, "your-data", "--out", "o", "--until", "validate") == [
        ("generate", "run"), ("validate", "run"), ("release", "stop"), ("evaluate", "stop")]


def test_the_demo_recipe_gives_the_demo_rows(built):
    """The build's rows equal `safetypairs demo`'s (golden digests, n=4, seed 0) on the columns the demo has."""
    from demo_rows import rows_digest
    from safetypairs.engine.datafiles import load_release, read_rows

    _, out = built
    for stage, folder in (("edit", "generate"), ("validate", "validate")):
        rows = read_rows(out / folder)
        assert rows_digest(rows.select_columns(GOLDEN[stage]["columns"]))["digest"] == GOLDEN[stage]["digest"], stage
    for name in ("pairs", "images"):
        assert rows_digest(load_release(str(out / "release"), name, "test")) == GOLDEN[f"release/{name}/test"]
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert set(results["guards"]) == {"ocr-lexicon", "nudenet"}


def test_a_finished_build_is_reused_and_its_card_carries_the_recipe(built, capsys):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    recipe, out = built
    assert _plan(capsys, str(recipe), "--out", str(out)) == [(s, "reuse") for s in ("generate", "validate", "release",
                                                                                      "evaluate")]
    card = DatasetCard.load(out / "release" / "README.md")
    recorded = card.data.to_dict()["safetypairs_recipe"]
    assert recorded["generate"]["source"] == "demo:4" and recorded["generate"]["candidates"] == 1
    assert recorded["validate"]["judge"] == "ocr-lexicon:box_thresh=0.3,unclip_ratio=2.0"
    assert recorded["provenance"]["versions"]["datasets"] and "## Provenance" in card.text
    assert len(load_dataset(str(out / "release"), "pairs")["test"]) == GOLDEN["release/pairs/test"]["rows"]
    # --from takes the stages before it as they are; --until stops after one
    assert _plan(capsys, str(recipe), "--out", str(out), "--from", "release", "--until", "release") == [
        ("generate", "reuse"), ("validate", "reuse"), ("release", "reuse"), ("evaluate", "stop")]
    assert main(["build", str(recipe), "--out", str(out.parent / "empty"), "--from", "validate", "--dry-run"]) == 2
    assert "--from validate: generate has not finished" in capsys.readouterr().err
    # --from-release re-plans the recorded recipe: the same stages, all reused here
    assert _plan(capsys, "--from-release", str(out / "release"), "--out", str(out)) == [
        (s, "reuse") for s in ("generate", "validate", "release", "evaluate")]


def _copy_generate(built, dest):
    """A build folder holding only the module build's finished generate stage."""
    _, out = built
    shutil.copytree(out / "generate", dest / "generate")
    state = json.loads((out / "build.json").read_text())
    (dest / "build.json").write_text(json.dumps({"stages": {"generate": state["stages"]["generate"]}}))


def test_changing_a_validate_threshold_reruns_validate_onward_and_reuses_generate(built, tmp_path, capsys):
    _, out = built
    shutil.copytree(out, tmp_path / "out")
    changed = _recipe_file(tmp_path, **{"validate.thresholds": "pixel-exact"})
    plan = _plan(capsys, str(changed), "--out", str(tmp_path / "out"))
    assert plan == [("generate", "reuse"), ("validate", "run"), ("release", "run"), ("evaluate", "run")]
    generate_meta = (tmp_path / "out" / "generate" / "run.json").read_text()
    before = json.loads((tmp_path / "out" / "validate" / "run.json").read_text())["fingerprint"]
    assert main(["-q", "build", str(changed), "--out", str(tmp_path / "out"), "--until", "validate"]) == 0
    assert "settings changed: thresholds" in capsys.readouterr().out
    assert (tmp_path / "out" / "generate" / "run.json").read_text() == generate_meta
    assert json.loads((tmp_path / "out" / "validate" / "run.json").read_text())["fingerprint"] != before


def test_a_build_killed_in_validate_resumes_and_gives_the_rows_of_an_uninterrupted_one(built, tmp_path, capsys):
    from demo_rows import rows_digest
    from safetypairs.engine.datafiles import read_rows

    _copy_generate(built, tmp_path)
    recipe = _recipe_file(tmp_path, **{"validate.chunk_size": 2})  # 4 rows: two chunks
    argv = ["build", str(recipe), "--out", str(tmp_path), "--until", "validate"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "paused_cli.py"), "600", "-q", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    chunks = tmp_path / "validate.partial" / "chunks"
    try:
        deadline = time.time() + 240
        while not list(chunks.glob("chunk-*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert list(chunks.glob("chunk-*.json")), proc.communicate(timeout=5) if proc.poll() is not None else "timeout"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "validate").exists()
    assert main(["-q", "build", *argv[1:]]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"generate\s+reuse", printed) and re.search(r"validate\s+run\s+resumes", printed)
    meta = json.loads((tmp_path / "validate" / "run.json").read_text())["timings"]
    assert meta["chunks_reused_last_run"] == 1 and meta["chunks_computed_last_run"] == 1
    _, out = built
    assert rows_digest(read_rows(tmp_path / "validate")) == rows_digest(read_rows(out / "validate"))


def test_the_review_gate_stops_the_build_until_decisions_exist(built, tmp_path, capsys):
    from safetypairs import schema as S
    from safetypairs.engine.datafiles import read_rows
    from safetypairs.review.store import append_decision, candidate_ids, candidate_stamps, make_decision

    _, out = built
    shutil.copytree(out, tmp_path / "out")
    gated = _recipe_file(tmp_path, **{"release.require_review": True})
    argv = ["-q", "build", str(gated), "--out", str(tmp_path / "out"), "--until", "release"]
    rows = read_rows(tmp_path / "out" / "validate")
    accepted = sum(bool(a) for a in rows[S.ACCEPTED])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{accepted} of {accepted} accepted pairs wait" in err and "safetypairs review" in err
    for cid, stamp, ok in zip(candidate_ids(rows), candidate_stamps(rows), rows[S.ACCEPTED]):
        if ok:
            append_decision(tmp_path / "out" / "validate", make_decision("ann", cid, "accept", content=stamp))
    assert main(argv) == 0
    assert (tmp_path / "out" / "release" / "README.md").is_file()
    assert "human" in (tmp_path / "out" / "release" / "README.md").read_text().lower()


def test_the_slurm_script_parses_and_its_torchrun_rendezvous_comes_from_slurm():
    text = (ROOT / "README.md").read_text()
    script = re.search(r"^```sh\n(.*?)^```", text, re.M | re.S).group(1)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    torchrun = script[script.index("torchrun"):].replace("\\\n", " ")
    for variable in ("$SLURM_NNODES", "$SLURM_GPUS_ON_NODE", "$SLURM_NODEID", "$SLURM_NODELIST", "$SLURM_JOB_ID"):
        assert variable in torchrun, variable
    assert "--rdzv_backend c10d" in torchrun and "-m safetypairs build" in torchrun


@pytest.mark.slow  # two launched processes each load the OCR models (about a minute on two cores)
def test_under_torchrun_sharded_stages_shard_and_the_release_runs_once(built, tmp_path):
    """Two torchrun ranks: validate shards (2 processes in run.json, rows as one process gives them), release runs on
    rank 0 only and its card carries the recipe; the stages share one process group."""
    from demo_rows import rows_digest
    from safetypairs.engine.datafiles import read_rows
    from safetypairs.release.card import recorded_recipe

    _copy_generate(built, tmp_path)
    recipe = _recipe_file(tmp_path, **{"validate.chunk_size": 2})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "safetypairs", "-q", "build", str(recipe), "--out", str(tmp_path), "--until",
                           "release"], capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("release written to") == 1 and proc.stdout.count("plan for demo") == 1
    assert json.loads((tmp_path / "validate" / "run.json").read_text())["num_processes"] == 2
    _, out = built
    assert rows_digest(read_rows(tmp_path / "validate")) == rows_digest(read_rows(out / "validate"))
    assert recorded_recipe(tmp_path / "release" / "README.md")["validate"]["chunk_size"] == 2
