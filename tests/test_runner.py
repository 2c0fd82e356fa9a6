"""The shared runner: chunks, fingerprints, reuse, failure and resume, locks, atomic folders, torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from runner_job import compute, toy_rows

from safetypairs import schema as S
from safetypairs.engine.chunks import Claims, chunk_path, chunk_ranges, chunk_spans, claims_folder, open_claims
from safetypairs.engine.datafiles import load_run
from safetypairs.engine.folders import (
    LOCK_FILE,
    atomic_dir,
    check_not_input,
    open_partial,
    partial_dir,
    read_json,
)
from safetypairs.engine.runner import RunConfig, run_stage
from safetypairs.engine.folders import OutputDirError

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "tests" / "runner_job.py")]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}")


def _table(out: Path):
    return pq.read_table(sorted((out / "data").glob("train-*.parquet")))


def _run(out: Path, chunk_size: int = 2, calls: list | None = None, fail_at: str | None = None, **kw):
    inner = compute(0.0)

    def counted(rows, device):
        if calls is not None:
            calls.append(rows[0]["row_id"])
        if fail_at is not None and fail_at in rows["row_id"]:
            raise RuntimeError(f"injected failure at {fail_at}")
        return inner(rows, device)

    return run_stage(toy_rows(7), counted, stage="toy", settings={"version": 1, **kw},
                     run=RunConfig(out, chunk_size=chunk_size), device="cpu")


def test_chunks_are_fixed_and_the_contiguous_reference_deals_them_out_in_runs():
    assert chunk_spans(10, 3) == [(0, 0, 3), (1, 3, 6), (2, 6, 9), (3, 9, 10)]
    assert chunk_spans(1, 64) == [(0, 0, 1)] and chunk_spans(0, 5) == []
    assert [chunk_ranges(10, 3, rank, 2) for rank in range(2)] == [[(0, 0, 3), (1, 3, 6)], [(2, 6, 9), (3, 9, 10)]]
    for n, size, world in [(10, 3, 1), (10, 3, 8), (1, 64, 4), (0, 5, 2)]:
        assert [s for rank in range(world) for s in chunk_ranges(n, size, rank, world)] == chunk_spans(n, size)


def test_each_chunk_is_claimed_by_exactly_one_rank_and_a_new_attempt_drops_old_claims(tmp_path):
    open_claims(tmp_path, "old")
    ranks = [Claims(tmp_path, "old", rank) for rank in range(8)]
    won: list[tuple[int, int]] = []
    start = threading.Barrier(len(ranks))

    def grab(claims: Claims) -> None:
        start.wait()
        won.extend((c, claims.rank) for c in range(50) if claims.take(c))

    threads = [threading.Thread(target=grab, args=(claims,)) for claims in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(c for c, _ in won) == list(range(50))  # every chunk once, never twice
    assert ranks[0].ranks() == {str(c): rank for c, rank in sorted(won)}
    assert read_json(ranks[3].path(7))["rank"] == dict(won)[7] and read_json(ranks[3].path(7))["pid"] == os.getpid()
    assert ranks[0].take(3, ".pass-001") and ranks[0].ranks()["3.pass-001"] == 0
    open_claims(tmp_path, "new")  # the next attempt: the old claims go, its chunks can be claimed again
    assert not claims_folder(tmp_path, "old").exists() and Claims(tmp_path, "new", 1).take(7)


def _finished(work: Path, index: int, seconds: float, piece: str = "") -> None:
    chunk_path(work, index, f"{piece}.parquet").write_bytes(b"rows")
    chunk_path(work, index, f"{piece}.json").write_text(json.dumps({"chunk": index, "seconds": {"compute": seconds}}))


def test_a_rank_waits_for_claimed_chunks_while_they_progress_and_fails_clearly_when_they_stall(tmp_path, monkeypatch):
    from safetypairs.engine import runner

    monkeypatch.setattr(runner, "STALL_MINUTES", 0.3 / 60)  # a 0.3 s stall window (4 x 0.01 s chunks is less)
    spans = chunk_spans(6, 2)
    open_claims(tmp_path, "run")
    other = Claims(tmp_path, "run", 2)
    assert all(other.take(c) for c in range(3))
    later = threading.Timer(0.8, _finished, (tmp_path, 0, 0.01))  # no chunk finished yet: no scale, no deadline
    later.start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="nothing finished for 0 s") as err:
        runner._wait_for_chunks(tmp_path, spans, Claims(tmp_path, "run", 0), "toy")
    assert time.monotonic() - t0 >= 0.8 + 0.3  # the window counts from the first chunk that finished
    later.join()
    assert f"2 chunk(s) are unfinished (chunk-000001: rank 2 (pid {os.getpid()}" in str(err.value)
    assert "chunk-000002: rank 2" in str(err.value) and "run the command again to resume" in str(err.value)
    monkeypatch.setattr(runner, "STALL_MINUTES", 3 / 60)
    for c in (1, 2):  # each finishes within the window of the one before
        threading.Timer(0.5 * c, _finished, (tmp_path, c, 0.01)).start()
    t0 = time.monotonic()
    runner._wait_for_chunks(tmp_path, spans, Claims(tmp_path, "run", 0), "toy")
    assert chunk_path(tmp_path, 2, ".json").exists() and time.monotonic() - t0 < 5


def test_a_pass_that_runs_is_not_judged_by_the_seconds_of_another(tmp_path, monkeypatch):
    """Guard-major passes: a fast guard's pieces say nothing of how long a slow guard's take, so while only a piece of
    a pass none of whose pieces has finished runs, the wait has no limit."""
    from safetypairs.engine import runner

    monkeypatch.setattr(runner, "STALL_MINUTES", 0.3 / 60)
    (tmp_path / "chunks").mkdir()
    open_claims(tmp_path, "run")
    other = Claims(tmp_path, "run", 1)
    assert other.take(0, ".pass-000") and other.take(1, ".pass-001")
    _finished(tmp_path, 0, 0.01, ".pass-000")  # a fast pass's piece: a 0.3 s window, had it been the scale

    def slow_pass_done() -> None:
        for c in (0, 1):
            _finished(tmp_path, c, 0.01)

    later = threading.Timer(1.0, slow_pass_done)
    later.start()
    t0 = time.monotonic()
    runner._wait_for_chunks(tmp_path, chunk_spans(2, 1), Claims(tmp_path, "run", 0), "toy")
    later.join()
    assert time.monotonic() - t0 >= 1.0


def test_finished_run_is_reused_without_compute_and_rows_do_not_depend_on_chunking(tmp_path):
    calls: list[str] = []
    summary = _run(tmp_path / "a", calls=calls)
    assert summary.rows_out == 7 and summary.chunks_computed == 4 and len(calls) == 4
    assert summary.statuses == {"toy": {"even": 4, "odd": 3}}
    meta = read_json(tmp_path / "a" / "run.json")
    assert meta["status"] == "finished" and meta["rows_in"] == 7 and not (tmp_path / "a" / "chunks").exists()
    again = _run(tmp_path / "a", calls=calls)
    assert len(calls) == 4 and again.chunks_computed == 0 and again.rows_out == 7  # zero compute calls
    _run(tmp_path / "b", chunk_size=3)
    assert _table(tmp_path / "a").equals(_table(tmp_path / "b"))
    assert load_run(tmp_path / "a")["row_id"] == [f"r{i:03d}" for i in range(7)]


def test_a_failed_run_records_the_error_and_resumes_to_the_same_rows(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(out, fail_at="r004")
    work = partial_dir(out)
    meta = read_json(work / "run.json")
    assert not out.exists() and meta["status"] == "failed" and "injected failure at r004" in meta["error"]
    assert not (work / LOCK_FILE).exists()
    failed = [p for p in (work / "chunks" / "claims").glob("*/chunk-*.json")]
    assert sorted(p.name for p in failed)[-1] == "chunk-000002.json"  # the failed attempt's claim stays behind
    calls: list[str] = []
    summary = _run(out, calls=calls)
    assert calls == ["r004", "r006"] and summary.chunks_reused == 2 and not work.exists()
    assert read_json(out / "run.json")["timings"]["chunk_ranks_last_run"] == {"2": 0, "3": 0}
    _run(tmp_path / "ref")
    assert _table(out).equals(_table(tmp_path / "ref"))


def test_changed_settings_and_foreign_folders_are_refused(tmp_path):
    _run(tmp_path / "run")
    with pytest.raises(OutputDirError, match="holds a different run"):
        _run(tmp_path / "run", extra=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="holds other files"):
        _run(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputDirError, match="is the input"):
        check_not_input(tmp_path / "in", (tmp_path / "in",))
    with pytest.raises(OutputDirError, match="contains it"):
        check_not_input(tmp_path, (tmp_path / "in",))
    check_not_input(tmp_path / "out", (tmp_path / "in",))


def test_an_unfinished_run_under_other_settings_is_refused_not_resumed(tmp_path):
    """Chunks of a run that stopped half-way are reused only by the same settings: others are refused, and
    ``overwrite`` discards those chunks and computes every chunk again."""
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(out, fail_at="r004")  # chunks 0 and 1 done, under version 1
    work = partial_dir(out)
    done = sorted(p.name for p in (work / "chunks").glob("chunk-*.json"))
    assert done == ["chunk-000000.json", "chunk-000001.json"]
    calls: list[str] = []
    with pytest.raises(OutputDirError, match="unfinished run with different settings"):
        _run(out, calls=calls, extra=1)
    assert calls == [] and sorted(p.name for p in (work / "chunks").glob("chunk-*.json")) == done  # left as it was
    summary = run_stage(toy_rows(7), compute(0.0), stage="toy", settings={"version": 1, "extra": 1},
                        run=RunConfig(out, chunk_size=2, overwrite=True), device="cpu")
    assert summary.chunks_computed == 4 and summary.chunks_reused == 0
    assert read_json(out / "run.json")["settings"] == {"version": 1, "extra": 1}


def test_overwrite_carries_the_files_a_stage_keeps_and_drops_the_rest(tmp_path, caplog):
    out = tmp_path / "run"
    _run(out)
    (out / "review.jsonl").write_text("decision\n")
    (out / "notes.txt").write_text("scratch")

    def rerun(**settings):
        return run_stage(toy_rows(7), compute(0.0), stage="toy", settings={"version": 2, **settings},
                         run=RunConfig(out, chunk_size=2, overwrite=True), device="cpu", keep=("review.jsonl", "gone.txt"))

    assert rerun().rows_out == 7 and read_json(out / "run.json")["settings"] == {"version": 2}
    assert sorted(p.name for p in out.iterdir()) == ["data", "review.jsonl", "run.json"]
    assert (out / "review.jsonl").read_text() == "decision\n"
    assert "toy: kept review.jsonl" in caplog.text and "gone.txt" not in caplog.text
    assert not list(tmp_path.glob(".run.old-*")) and not partial_dir(out).exists()


def test_lock_held_by_a_live_process_refuses_and_a_dead_one_is_taken_over(tmp_path):
    out = tmp_path / "run"
    work = open_partial(out)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (work / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "since": "now"}))
        with pytest.raises(OutputDirError, match=f"pid {sleeper.pid}"):
            _run(out)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _run(out).rows_out == 7  # the holder is gone: its lock is stale


def test_atomic_dir_leaves_the_previous_folder_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with atomic_dir(out, overwrite=False) as work:
            (work / "half.txt").write_text("half")
            1 / 0
    assert not out.exists() and not partial_dir(out).exists()
    with atomic_dir(out, overwrite=False) as work:
        (work / "v1.txt").write_text("v1")
    with pytest.raises(OutputDirError, match="not empty"):
        with atomic_dir(out, overwrite=False):
            pass
    with pytest.raises(ZeroDivisionError):
        with atomic_dir(out, overwrite=True) as work:
            1 / 0
    assert [p.name for p in out.iterdir()] == ["v1.txt"]
    with atomic_dir(out, overwrite=True) as work:
        (work / "v2.txt").write_text("v2")
    assert [p.name for p in out.iterdir()] == ["v2.txt"]


def _job(out: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "tests" / "runner_job.py")] \
        if launcher else JOB
    proc = subprocess.run([*cmd, str(out), *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _ranks(out: Path) -> Counter:
    """How many chunks (or pieces) each rank of the last attempt computed, from the claims ``run.json`` keeps."""
    return Counter(read_json(out / "run.json")["timings"]["chunk_ranks_last_run"].values())


SLOW = ("--rows", "24", "--chunk-size", "1", "--sleep", "0.1", "--slow-rank", "2", "--slow-factor", "8")
THREE = ("--standalone", "--nproc_per_node", "3")


def test_three_ranks_claim_chunks_as_they_go_and_a_slow_rank_computes_fewer(tmp_path):
    """Rank 2 takes 8x as long per chunk: dealt out up front it would compute 8 of the 24 chunks (a third, the
    wall bounded by its share); claiming, it computes fewer than either fast rank, and the rows are those of one
    process."""
    _job(tmp_path / "one", "--rows", "24", "--chunk-size", "1")
    _job(tmp_path / "three", *SLOW, launcher=THREE)
    assert _table(tmp_path / "three").equals(_table(tmp_path / "one"))
    ranks = _ranks(tmp_path / "three")
    assert sum(ranks.values()) == 24 and set(ranks) == {0, 1, 2}
    assert ranks[2] < min(ranks[0], ranks[1]) and ranks[2] < len(chunk_ranges(24, 1, 2, 3)), ranks
    meta = read_json(tmp_path / "three" / "run.json")
    assert meta["num_processes"] == 3 and meta["usage"]["toy"]["rows"]["requests"] == 24


def test_three_ranks_claim_each_pass_and_join_of_guard_major_passes(tmp_path):
    """`Passes` (evaluate's guard-major order) claimed piece by piece and joined by whoever claims the join: the rows
    of one process without passes, the slow rank computing the fewest pieces."""
    _job(tmp_path / "one", "--rows", "12", "--chunk-size", "1")
    _job(tmp_path / "three", *SLOW[2:], "--rows", "12", "--passes", launcher=THREE)
    assert _table(tmp_path / "three").equals(_table(tmp_path / "one"))
    claimed = read_json(tmp_path / "three" / "run.json")["timings"]["chunk_ranks_last_run"]
    assert sorted(claimed) == sorted([f"{c}{piece}" for c in range(12) for piece in ("", ".pass-000", ".pass-001")])
    pieces = Counter(rank for name, rank in claimed.items() if ".pass-" in name)
    assert sum(pieces.values()) == 24 and pieces[2] < min(pieces[0], pieces[1]), pieces
    assert read_json(tmp_path / "three" / "run.json")["statuses"] == {"toy": {"even": 6, "odd": 6}}


def test_two_processes_and_two_nodes_give_the_rows_of_one(tmp_path):
    _job(tmp_path / "one")
    _job(tmp_path / "two", launcher=("--standalone", "--nproc_per_node", "2"))
    assert _table(tmp_path / "two").equals(_table(tmp_path / "one"))
    assert read_json(tmp_path / "two" / "run.json")["num_processes"] == 2
    _two_agents(tmp_path / "nodes")
    assert _table(tmp_path / "nodes").equals(_table(tmp_path / "one"))
    for run in ("one", "two", "nodes"):  # each rank's counts, from its chunks' markers, added up on rank 0
        usage = read_json(tmp_path / run / "run.json")["usage"]["toy"]["rows"]
        assert usage["requests"] == usage["answers"] == 7 and usage["retries"] == 0


PORT_TAKEN = ("address already in use", "eaddrinuse", "errno 98")


def _two_agents(out: Path, tries: int = 3) -> None:
    """Two torchrun agents on this machine, c10d rendezvous on localhost.

    The rendezvous port must be named to both agents before either binds it, so it is picked free and may be taken
    by another process in between (parallel test workers, other jobs): a clash is retried on a new port, any other
    failure fails at once.
    """
    for attempt in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"sp-test-{attempt}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "tests" / "runner_job.py"), str(out)]
        agents = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        errors = [agent.communicate(timeout=300)[1].decode() for agent in agents]
        failed = [err for agent, err in zip(agents, errors) if agent.returncode != 0]
        if not failed:
            return
        if not any(word in err.lower() for err in failed for word in PORT_TAKEN) or attempt == tries - 1:
            pytest.fail(failed[0][-3000:])


def test_sigkill_after_the_first_chunk_resumes_and_a_second_writer_refuses(tmp_path):
    out = tmp_path / "run"
    work = partial_dir(out)
    # every chunk after the first sleeps 10 minutes: the process is killed long before that, however slowly the
    # second writer below starts on a loaded machine (a 30 s delay let chunk 1 finish under load 10 on 2 cores)
    proc = subprocess.Popen([*JOB, str(out), "--delay", "600"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (work / "chunks" / "chunk-000000.json").exists():
        time.sleep(0.02)
    second = subprocess.run([*JOB, str(out)], env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "being written by another safetypairs process" in second.stderr
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list((work / "chunks").glob("chunk-*.json"))) == 1 and not out.exists()
    left = sorted(p.name for p in (work / "chunks" / "claims").glob("*/chunk-*.json"))
    assert left == ["chunk-000000.json", "chunk-000001.json"]  # the killed run held chunk 1, never finished
    done = _job(out)  # the dead process's lock is stale, and so is its claim of chunk 1
    assert "1 computed" not in done.stdout and "3 computed, 1 reused" in done.stdout
    assert read_json(out / "run.json")["timings"]["chunk_ranks_last_run"] == {"1": 0, "2": 0, "3": 0}
    assert read_json(out / "run.json")["usage"]["toy"]["rows"]["requests"] == 7  # the killed run's chunk counted once
    _job(tmp_path / "ref")
    assert _table(out).equals(_table(tmp_path / "ref"))


def test_two_local_folders_with_the_same_name_each_load_their_own_rows(tmp_path):
    """`datasets` caches a local folder by its base name and config: two "release/" folders must not mix."""
    from safetypairs.engine.datafiles import load_checked, write_parquet

    for n, parent in ((3, "a"), (5, "b")):
        release = tmp_path / parent / "release"
        (release / "data" / "images").mkdir(parents=True)
        write_parquet(Dataset.from_dict({"x": list(range(n))}), release / "data" / "images" / "test-0.parquet")
        (release / "README.md").write_text("---\nconfigs:\n- config_name: images\n  data_files:\n  - split: test\n"
                                           "    path: data/images/test-*.parquet\n---\n")
        assert load_checked(str(release), "images")["test"]["x"] == list(range(n))
    with pytest.raises(ValueError, match="has no config 'pairs'"):
        load_checked(str(tmp_path / "a" / "release"), "pairs")


def test_finalize_gets_the_data_files_and_reads_rows_only_when_it_asks(tmp_path, monkeypatch):
    from safetypairs.engine import datafiles

    def no_cache(*args, **kwargs):
        raise AssertionError("load_dataset called: the finish built a datasets cache")

    monkeypatch.setattr(datafiles, "load_dataset", no_cache)
    seen = {}

    def finalize(work, files, summary):
        seen["files"] = [p.relative_to(work).as_posix() for p in files.paths if p.is_file()]
        if summary.stage == "asks":
            seen["rows"] = files.rows()
        return {"extra": 1}

    for stage in ("ignores", "asks"):
        run_stage(toy_rows(5), compute(0.0), stage=stage, settings={}, run=RunConfig(tmp_path / stage, chunk_size=2),
                  device="cpu", finalize=finalize)
        assert seen["files"] == read_json(tmp_path / stage / "run.json")["files"] == ["data/train-00000-of-00001.parquet"]
        assert read_json(tmp_path / stage / "run.json")["extra"] == 1
    written = _table(tmp_path / "asks")
    assert seen["rows"]["row_id"] == written.column("row_id").to_pylist() == [f"r{i:03d}" for i in range(5)]
    assert seen["rows"]["centre"] == written.column("centre").to_pylist() and not seen["rows"].cache_files


def test_a_run_checks_its_inputs_once_when_made(tmp_path, monkeypatch):
    from safetypairs.engine import runner

    source = tmp_path / "in"
    source.mkdir()
    with pytest.raises(OutputDirError, match="lies inside it"):
        RunConfig(source / "out", inputs=(source,))
    calls = []
    monkeypatch.setattr(runner, "check_not_input", lambda out, inputs: calls.append(inputs))
    run = RunConfig(tmp_path / "out", source=str(source), inputs=(str(source), "org/not-a-path"))
    assert calls == [(str(source),)]  # hub ids and other names that are not local paths are not checked
    assert run.reading(str(source)) is run and len(calls) == 1  # a stage reading what the command named
    assert run.reading(tmp_path / "more").inputs[-1] == tmp_path / "more" and len(calls) == 2
    run_stage(toy_rows(3), compute(0.0), stage="toy", settings={}, run=run, device="cpu")
    assert len(calls) == 2  # the runner does not check again


def test_a_command_checks_its_output_against_its_input_once(tmp_path, monkeypatch):
    from release_rows import validated_rows

    from safetypairs.cli import main
    from safetypairs.engine import folders, runner

    validated_rows(n_sources=2, candidates=1, size=48).save_to_disk(str(tmp_path / "in"))
    calls = []
    for module in (runner, folders):
        monkeypatch.setattr(module, "check_not_input",
                            lambda out, inputs, _f=module.check_not_input: calls.append(out) or _f(out, inputs))
    assert main(["validate", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert calls == [str(tmp_path / "out")]
    assert main(["validate", str(tmp_path / "in"), "--out", str(tmp_path / "in" / "out"), "--device", "cpu"]) == 2
    assert not (tmp_path / "in" / "out").exists()


def test_stage_configs_are_checked_once_per_run_not_per_chunk(tmp_path, monkeypatch):
    from collections import Counter

    from release_rows import validated_rows

    from safetypairs.edit import EditConfig
    from safetypairs.engine.runner import for_rank
    from safetypairs.generate import GenerateConfig, run_generate
    from safetypairs.instruct import InstructConfig
    from safetypairs.validate.stage import ValidateConfig, validate_run

    checks: Counter = Counter()
    for cls in (ValidateConfig, InstructConfig, EditConfig):
        monkeypatch.setattr(cls, "__post_init__", lambda self, _f=cls.__post_init__: checks.update(
            [type(self).__name__]) or _f(self))
    config = ValidateConfig(device="auto", num_proc=2)
    ranked = for_rank(config, "cpu")
    assert (ranked.device, ranked.num_proc, config.device, config.num_proc) == ("cpu", None, "auto", 2)
    summary = validate_run(validated_rows(n_sources=3, candidates=1, size=48), config,
                           RunConfig(tmp_path / "validated", chunk_size=1))
    assert summary.chunks_computed == 3 and checks == {"ValidateConfig": 1}
    generate = GenerateConfig(device="cpu")
    assert checks == {"ValidateConfig": 1, "InstructConfig": 1, "EditConfig": 1}
    empty = Dataset.from_dict({name: [] for name in S.SOURCE_FEATURES}, features=S.SOURCE_FEATURES)
    for device in ("cpu", "cpu", None):
        run_generate(empty, generate, device)
    assert checks == {"ValidateConfig": 1, "InstructConfig": 1, "EditConfig": 1}
