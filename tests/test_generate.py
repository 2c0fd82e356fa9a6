"""Tests for generation at scale: chained stages, 2-process sharding, kill-and-resume, run metadata."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from tiny_models import build_tiny_ip2p

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.backends.diffusion_pipelines import work_size
from safetypairs.engine.datafiles import load_run, read_rows
from safetypairs.engine.folders import open_partial, partial_dir
from safetypairs.generate import GenerateConfig, generate_pairs, generate_run
from safetypairs.engine.runner import RunConfig

ROOT = Path(__file__).resolve().parents[1]
N_SOURCES = 6
EDITOR_OPTIONS = "steps=1,resolution=16"


def _source(n: int = N_SOURCES) -> Dataset:
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "cat"]
    rows: dict[str, list] = {S.SOURCE_ID: [], S.IMAGE: [], S.CATEGORY: [], S.RATIONALE: [], "instruction": []}
    for i in range(n):
        photo = PILImage.fromarray(getattr(data, names[i % len(names)])()).convert("RGB")
        rows[S.SOURCE_ID].append(f"src-{i:03d}")
        rows[S.IMAGE].append(photo.resize((30 + 3 * i, 26)))  # odd, distinct sizes
        rows[S.CATEGORY].append("O99" if i == 2 else "O6")  # one unknown category -> a status row
        rows[S.RATIONALE].append("a knife is brandished at a person")
        rows["instruction"].append("" if i == 4 else "Replace the knife with a wooden spoon")  # one missing
    features = Features({S.SOURCE_ID: Value("string"), S.IMAGE: Image(), S.CATEGORY: Value("string"),
                         S.RATIONALE: Value("string"), "instruction": Value("string")})
    return Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("generate")
    source = root / "source"
    _source().save_to_disk(str(source))
    return {"root": str(root), "source": str(source), "editor": build_tiny_ip2p(root / "ip2p")}


def _cli_args(setup: dict[str, str], out: Path, chunk_size: int = 2) -> list[str]:
    return ["-m", "safetypairs", "-q", "generate", "--source", setup["source"], "--out", str(out),
            "--instructor", "column:instruction", "--editor", f"diffusers:{setup['editor']}",
            "--editor-options", EDITOR_OPTIONS, "--candidates", "2", "--control", "--device", "cpu",
            "--chunk-size", str(chunk_size), "--batch-size", "2"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _table(out: Path):
    files = sorted((out / "data").glob("train-*.parquet"))
    assert files, f"no merged data in {out}"
    return pq.read_table(files)


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """An uninterrupted 1-process CLI run (the rows every other run must reproduce)."""
    out = Path(setup["root"]) / "ref"
    proc = _run(_cli_args(setup, out))
    assert "generate: 6 rows in, 12 out" in proc.stdout
    return out


def test_reference_rows_and_metadata(reference):
    rows = load_run(reference)
    assert len(rows) == N_SOURCES * 2  # rows in x candidates, failures included as status rows
    assert rows[S.SOURCE_ID] == [f"src-{i:03d}" for i in range(N_SOURCES) for _ in range(2)]
    assert rows[S.CANDIDATE] == [0, 1] * N_SOURCES
    by_source = dict(zip(rows[S.SOURCE_ID], rows[S.INSTRUCT_STATUS]))
    assert by_source["src-002"] == "unknown_category" and by_source["src-004"] == "missing_instruction"
    ok = [r for r in rows if r[S.EDIT_STATUS] == ST.OK]
    assert len(ok) == 8
    seeds = [r[S.SEED] for r in ok]
    assert len(set(seeds)) == len(seeds)  # distinct recorded seeds per candidate
    for r in ok:  # edits are exactly the source size; controls only on candidate 0
        assert r[S.EDITED_IMAGE].size == r[S.IMAGE].size
        assert r[S.EDIT_WORK_SIZE] == list(work_size(r[S.IMAGE].size, 16, 2))  # recorded, then mapped back
        assert (r[S.CONTROL_IMAGE] is not None) == (r[S.CANDIDATE] == 0)
    meta = json.loads((reference / "run.json").read_text())
    assert meta["policy"] == "llavaguard@1.1" and meta["rows_in"] == N_SOURCES
    assert meta["models"]["editor"]["revision"] == "local"
    assert {"torch", "diffusers", "datasets", "accelerate"} <= set(meta["versions"])
    assert meta["statuses"]["edit"] == {"ok": 8, "not_instructed": 4}
    assert len(meta["timings"]["chunk_seconds"]) == 3


def test_two_processes_match_one(setup, reference):
    out = Path(setup["root"]) / "torchrun"
    # with another editor batch and the instructor kept (neither decides the rows, nor the run's fingerprint)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *_cli_args(setup, out),
          "--edit-batch-size", "1", "--keep-instructor", "on"])
    assert _table(out).equals(_table(reference))
    meta = json.loads((out / "run.json").read_text())
    assert meta["num_processes"] == 2


def test_killed_run_resumes_without_recomputing(setup, reference):
    out = Path(setup["root"]) / "killed"
    work = partial_dir(out)
    args = _cli_args(setup, out, chunk_size=2)
    # the same command, sleeping after each chunk it writes (tests/paused_cli.py), so the kill lands after chunk 0
    paused = [sys.executable, str(ROOT / "tests" / "paused_cli.py"), "120", *args[2:]]
    proc = subprocess.Popen(paused, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (work / "chunks" / "chunk-000000.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    done = sorted((work / "chunks").glob("chunk-*.json"))
    assert [p.name for p in done] == ["chunk-000000.json"], err.decode()[-3000:]
    assert not out.exists()  # the run folder appears whole, or not at all
    assert json.loads((work / "run.json").read_text())["status"] == "running"  # settings recorded up front
    refused = subprocess.run([sys.executable, *_cli_args(setup, out, chunk_size=3)], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "different settings" in refused.stderr  # no mixing with stale chunks
    _run(args)  # the SIGKILLed process left its lock behind: a dead pid's lock is taken over
    assert not work.exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "finished"
    assert meta["timings"]["chunks_reused_last_run"] == 1
    assert meta["timings"]["chunks_computed_last_run"] == 2
    assert _table(out).equals(_table(reference))


def test_changed_settings_refuse_the_same_folder(setup, reference):
    proc = subprocess.run([sys.executable, *_cli_args(setup, reference, chunk_size=3)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "holds a different run" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_pairs_in_process_matches_runner(setup, tmp_path):
    source = _source(3)
    options = dict(editor_options=(("steps", "1"), ("resolution", "16")), device="cpu", batch_size=2)
    rows = generate_pairs(source, "llavaguard", instructor="column:instruction",
                          editor=f"diffusers:{setup['editor']}", candidates=2, control=True, **options)
    assert len(rows) == 6 and set(rows[S.EDIT_STATUS]) == {ST.OK, "not_instructed"}
    config = GenerateConfig(instructor="column:instruction", editor=f"diffusers:{setup['editor']}",
                            candidates=2, control=True, **options)
    work = open_partial(tmp_path / "run")  # a run that failed before finishing any chunk does not block the folder
    (work / "run.json").write_text('{"fingerprint": "other", "status": "running"}')
    summary = generate_run(source, config, RunConfig(out=tmp_path / "run", chunk_size=2))
    assert summary.rows_out == 6 and summary.chunks_computed == 2
    ran = load_run(tmp_path / "run")
    assert ran[S.SEED] == rows[S.SEED] and ran[S.EDIT_STATUS] == rows[S.EDIT_STATUS]



def test_empty_source_is_a_clear_error(tmp_path):
    empty = _source(0)
    assert len(generate_pairs(empty, instructor="column:instruction", device="cpu")) == 0
    with pytest.raises(ValueError, match="input has no rows"):
        generate_run(empty, GenerateConfig(device="cpu"), RunConfig(out=tmp_path / "run"))
    assert not (tmp_path / "run").exists()

def test_config_errors_name_allowed_values():
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        GenerateConfig(candidates=0)
    with pytest.raises(ValueError, match="unknown editor 'diffuser'.*Did you mean 'diffusers'"):
        GenerateConfig(editor="diffuser:x")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        RunConfig(out="x", chunk_size=0)


def test_generate_pairs_takes_a_policy_object_and_llavaguard_labels():
    from safetypairs.policy import load_policy
    from safetypairs.sources import render_demo_row

    rows = [render_demo_row(i, 3) for i in range(2)] + [render_demo_row(5, 3, "benign")]
    rows[0][S.CATEGORY] = "O1: Hate, Humiliation, Harassment"
    rows[1][S.CATEGORY] = "hate, humiliation, harassment"
    rows[2].update({S.CATEGORY: "NA: None applying", S.SOURCE_LABEL: ""})
    out = generate_pairs(Dataset.from_list(rows, features=S.SOURCE_FEATURES), load_policy("llavaguard"), device="cpu")
    assert out[S.INSTRUCT_STATUS] == ["ok", "ok", ST.NOT_UNSAFE] and out[S.CATEGORY][:2] == ["O1", "O1"]
    assert out[S.EDIT_STATUS][:2] == ["ok", "ok"] and out[S.POLICY][0] == "llavaguard@1.1"


def test_a_source_no_row_of_which_can_be_instructed_is_refused_before_any_model(tmp_path):
    from safetypairs.generate import check_survivors
    from safetypairs.engine.runner import RunSummary

    source = Dataset.from_dict({S.IMAGE: [None] * 3, S.SOURCE_ID: ["a", "b", "c"],
                                S.CATEGORY: ["Hateful memes", "Hateful memes", "NA"]})
    with pytest.raises(ValueError, match=r"2 row\(s\): category 'Hateful memes' is not in policy .*--category-column"
                                         r".*1 row\(s\) labelled safe are set aside"):
        generate_run(source, GenerateConfig(device="cpu"), RunConfig(out=tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="ocr-inpaint option radius must be an integer, got 'abc'"):
        GenerateConfig(editor="ocr-inpaint:radius=abc")
    summary = RunSummary("generate", tmp_path, 3, 3, {"instruct": {"no_violation_found": 2, ST.NOT_UNSAFE: 1}}, 1, 0, 0.0)
    with pytest.raises(ValueError, match="all 2 rows ended no_violation_found -> the template instructor"):
        check_survivors(summary)
    check_survivors(RunSummary("generate", tmp_path, 3, 3, {"instruct": {"ok": 1, "instruct_error": 2}}, 1, 0, 0.0))
    check_survivors(RunSummary("generate", tmp_path, 3, 3, {"instruct": {"ok": 3}, "edit": {"ok": 1, "edit_error": 2}},
                               1, 0, 0.0))


def test_a_run_that_made_no_edit_fails_and_names_the_first_error(tmp_path):
    """template writes a generic instruction for a category without a lexicon; ocr-inpaint cannot carry it out."""
    from safetypairs.generate import generate_from_source
    from safetypairs.sources import demo_photo

    folder = tmp_path / "o2"
    folder.mkdir()
    lines = []
    for name in ("astronaut", "coffee"):
        demo_photo(name).save(folder / f"{name}.png")
        lines.append(json.dumps({"file_name": f"{name}.png", "rating": "Unsafe", "rationale": "a knife",
                                 "category": "O2: Violence, Harm, or Cruelty"}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"no row was edited \(edit: \{'edit_error': 2\}; instruct: \{'ok': 2\}\); the "
                                         r"first error: row 'astronaut.png': EditError: ocr-inpaint only carries out"):
        generate_from_source(str(folder), GenerateConfig(device="cpu"), RunConfig(out=tmp_path / "run"))
    assert read_rows(tmp_path / "run")[S.EDIT_STATUS] == ["edit_error", "edit_error"]  # kept for inspection


class ModelInstructor:
    """An instructor that holds a torch model (as hf-vlm does); weak references to every model it built."""

    models: list = []  # weakref.ref to each instructor's model (class-level: the registry builds the instance)
    calls: list = []

    def __init__(self):
        import weakref

        import torch

        self.model = torch.nn.Linear(64, 64)
        type(self).models.append(weakref.ref(self.model))

    @classmethod
    def from_spec(cls, arg, device="cpu", **_):
        return cls()

    def instruct(self, rows, policy):
        from safetypairs.backends.base import InstructResult

        type(self).calls.append(len(rows))
        return [InstructResult("Replace the knife with a wooden spoon", "knife") for _ in rows]


class WatchingEditor:
    """Inverts images; records, per call, its size and how many instructor models are still alive."""

    calls: list = []

    @classmethod
    def from_spec(cls, arg, device="cpu", **_):
        return cls()

    def edit(self, images, instructions, seeds):
        import gc

        from PIL import ImageOps

        gc.collect()  # what is alive now is held by someone, not waiting for the collector
        type(self).calls.append((len(images), sum(ref() is not None for ref in ModelInstructor.models)))
        return [ImageOps.invert(im) for im in images]


@pytest.fixture
def watched(monkeypatch):
    from safetypairs.backends import registry

    monkeypatch.setitem(registry.REGISTRY["instructors"], "model-instructor", f"{__name__}:ModelInstructor")
    monkeypatch.setitem(registry.REGISTRY["editors"], "watching", f"{__name__}:WatchingEditor")
    for cls in (ModelInstructor, WatchingEditor):
        monkeypatch.setattr(cls, "calls", [])
    monkeypatch.setattr(ModelInstructor, "models", [])
    registry.unload_backends()
    yield
    registry.unload_backends()


def test_the_instructor_is_freed_before_the_editor_runs(watched):
    source = _source(3).filter(lambda r: r[S.CATEGORY] == "O6")  # 2 instructable rows
    out = generate_pairs(source, instructor="model-instructor", editor="watching", candidates=2, device="cpu",
                         batch_size=1, edit_batch_size=2, keep_instructor=False)
    assert ModelInstructor.calls == [1, 1]  # the instructor's batch size
    assert WatchingEditor.calls == [(4, 0)]  # 2 rows x 2 candidates in one editor call; no instructor model alive
    assert out[S.EDIT_STATUS] == ["ok", "duplicate_candidate"] * 2
    for keep in (True, None):  # kept when asked, and by default on the CPU (no accelerator memory to free)
        WatchingEditor.calls.clear()
        generate_pairs(source, instructor="model-instructor", editor="watching", candidates=2, device="cpu",
                       batch_size=1, edit_batch_size=2, keep_instructor=keep)
        assert WatchingEditor.calls == [(4, 1)], keep


def test_edit_batch_size_and_keep_instructor_do_not_change_the_run_fingerprint():
    from safetypairs.generate import run_settings

    base = run_settings(GenerateConfig())
    assert run_settings(GenerateConfig(edit_batch_size=8, keep_instructor=True)) == base
    assert "editor_options" in base
    with pytest.raises(ValueError, match="edit_batch_size must be >= 1, got 0"):
        GenerateConfig(edit_batch_size=0)


def test_speed_options_are_recorded_and_an_approximated_editor_is_named(tmp_path):
    from tiny_models import build_tiny_flux_kontext

    from safetypairs.evaluate.caveats import approximated_editors

    kontext = build_tiny_flux_kontext(tmp_path / "kontext")
    config = GenerateConfig(instructor="column:instruction", editor=f"diffusers:{kontext},steps=1", device="cpu",
                            editor_options=(("resolution", "16"), ("cache", "first_block"), ("max_batch", "2"),
                                            ("vae_tiling", "off")))
    summary = generate_run(_source(2), config, RunConfig(out=tmp_path / "run"))
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["editor_options"] == [["resolution", "16"], ["cache", "first_block"], ["max_batch", "2"],
                                          ["vae_tiling", "off"]]
    rows = read_rows(summary.out)
    name = f"diffusers:{kontext},steps=1,cache=first_block"  # the spec, then the approximation it was run with
    assert rows[S.EDITOR] == [name, name] and rows[S.EDIT_STATUS] == ["ok", "ok"]
    assert f"`{name}`" in approximated_editors(rows[S.EDITOR]) and "step cache" in approximated_editors([name])
    assert approximated_editors([f"diffusers:{kontext},steps=1", "ocr-inpaint"]) is None
