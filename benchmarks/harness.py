"""Shared benchmark helpers: interleaved rounds with median ratios, where a runner's time goes, and the CLI as
1 vs 2 torchrun processes with wall clock, start-up and compute seconds apart.

Start-up of a CLI run = process launch until the last rank logs that it begins its chunks (the runner's
``"<stage> rank i/n on <device>: ..."`` INFO line, time-stamped here as it arrives on stderr). Compute =
chunk seconds (select + compute + write, from ``run.json``) of the busiest rank. Steady = the same without the
first chunk's model loading (imports, weights, warm-up: a fixed per-process cost). Tail = wall - start-up -
compute: the merge, finalize (reports), waiting for the slower rank and process teardown.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetypairs.cli import set_process_defaults

# Every path a benchmark measures, the bare loop as much as the in-process "runner (CLI path)", runs under the
# settings the safetypairs command sets for its own process before torch loads (PyTorch's huge pages for CPU tensors).
set_process_defaults()

ROOT = Path(__file__).resolve().parents[1]
RANK_LINE = re.compile(r" rank (\d+)/(\d+) on ")
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def load_line() -> str:
    """The 1/5/15-minute load average and the core count, for printing next to the numbers."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def interleaved(paths: Mapping[str, Callable[[int], Any]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of every path in every round; the order rotates each round so drifting load hits all alike.

    Args:
        paths: name -> ``fn(round)`` (the round index lets a path write a fresh output folder).
        rounds: how many rounds.

    Returns:
        name -> ``{"wall": seconds per round, "cpu": this process's CPU seconds per round}`` (CPU time is
        far less distorted than wall clock when other processes compete for the cores).
    """
    names = list(paths)
    seconds = {name: {"wall": [0.0] * rounds, "cpu": [0.0] * rounds} for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            paths[name](r)
            seconds[name]["wall"][r] = time.perf_counter() - t0
            seconds[name]["cpu"][r] = time.process_time() - c0
    return seconds


def print_overhead(title: str, seconds: Mapping[str, Mapping[str, Sequence[float]]], base: str,
                   goal: float) -> None:
    """Print each path's wall and CPU seconds per round and its median per-round ratio to ``base``."""
    print(title)
    for clock in ("wall", "cpu"):
        for name, runs in seconds.items():
            values = runs[clock]
            cells = " ".join(f"{v:6.2f}" for v in values)
            line = f"  {clock:<4} {name:<27} s/round {cells}   median {statistics.median(values):6.2f} s"
            if name != base:
                ratios = [v / b for v, b in zip(values, seconds[base][clock])]
                line += (f"   ratio/round {' '.join(f'{x:.3f}' for x in ratios)}   median {statistics.median(ratios):.3f}x "
                         f"(goal <= {goal:.2f}x)")
            print(line)


class DecodeClock:
    """Seconds the run writer spends decoding image cells to check them (`images.check_cell`) in this process,
    per use as a context manager (``with clock: ...`` appends one entry to ``seconds``)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __enter__(self) -> DecodeClock:
        from safetypairs.engine import imagechecks

        original = imagechecks.check_cell
        self.seconds.append(0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[-1] += time.perf_counter() - start

        self._restore = lambda: setattr(imagechecks, "check_cell", original)
        imagechecks.check_cell = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


def runner_parts(out: Path) -> dict[str, float]:
    """Where a finished run's seconds went, from its ``run.json``: the chunks' select / compute / write (summed
    over chunks) and rank 0's fingerprint / merge / finalize."""
    timings = json.loads((out / "run.json").read_text())["timings"]
    parts = {key: sum(chunk.get(key, 0.0) for chunk in timings["chunk_seconds"].values())
             for key in ("select", "compute", "write")}
    return {**parts, **{key: timings.get("rank0_seconds", {}).get(key, 0.0) for key in ("fingerprint", "merge", "finalize")}}


def print_runner_parts(name: str, outs: Sequence[Path], seconds: Mapping[str, Mapping[str, Sequence[float]]],
                       decode: Sequence[float], bare: str, mapped: str) -> None:
    """Print where the in-process runner path's wall seconds go (medians over rounds) and how its overhead over
    the bare loop splits into the stage's own (``mapped`` - bare) and the runner's (runner - ``mapped``)."""
    parts = [runner_parts(out) for out in outs]
    walls = seconds[name]["wall"]
    median = {key: statistics.median(p[key] for p in parts) for key in parts[0]}
    other = statistics.median(w - sum(p.values()) for w, p in zip(walls, parts))
    print(f"  where {name} goes (median s/round): chunks: select {median['select']:.2f}  compute "
          f"{median['compute']:.2f}  write {median['write']:.2f} (image check decode {statistics.median(decode):.2f})"
          f"  rank 0: fingerprint {median['fingerprint']:.2f}  merge {median['merge']:.2f}  finalize "
          f"{median['finalize']:.2f}  other (open, lock, move) {other:.2f}")
    base, stage = statistics.median(seconds[bare]["wall"]), statistics.median(seconds[mapped]["wall"])
    print(f"  {name} - {bare} = {statistics.median(walls) - base:.2f} s/round: the stage's own "
          f"({mapped} - {bare}) {stage - base:.2f} s + the runner's {statistics.median(walls) - stage:.2f} s")


def critical_path(meta: Mapping[str, Any]) -> tuple[float, float]:
    """Chunk seconds (compute + write) of the busiest rank of a finished run (the chunks it claimed, from
    run.json's ``timings.chunk_ranks_last_run``): all of them, and "steady" with
    each rank's first chunk (which loads the models: imports, weights, warm-up) counted at the median
    time of the run's other chunks."""
    seconds = {int(k): sum(v.values()) for k, v in meta["timings"]["chunk_seconds"].items()}
    # which rank computed each chunk (the ranks claim chunks as they go); pieces of passes ("3.pass-000") left out
    ranks = {int(k): r for k, r in meta["timings"]["chunk_ranks_last_run"].items() if "." not in k}
    spans = [sorted(c for c, r in ranks.items() if r == rank) for rank in range(meta["num_processes"])]
    later = [seconds[c] for chunks in spans for c in chunks[1:]]
    typical = statistics.median(later) if later else 0.0
    total = max(sum(seconds[c] for c in chunks) for chunks in spans)
    steady = max(sum(seconds[c] for c in chunks[1:]) + min(typical, seconds[chunks[0]]) for chunks in spans if chunks)
    return total, steady


def launch(cli_args: Sequence[str], out: Path, processes: int, threads: int = 1) -> dict[str, float]:
    """Run ``python -m safetypairs <cli_args> --out <out>`` (under torchrun for 2 processes).

    Returns:
        ``wall``, ``startup``, ``compute`` (busiest rank's chunk seconds), ``steady`` (the same without
        the model loading in each rank's first chunk), ``tail``, ``write`` (all chunks' writes: check
        decode + parquet), ``merge`` and ``finalize`` (rank 0) and ``cpu`` seconds (user + system of all
        the run's processes: less distorted by other load than wall clock).

    Raises:
        RuntimeError: when the command fails (its stderr tail included).
    """
    launcher = list(TORCHRUN) if processes == 2 else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
               SAFETYPAIRS_NO_PROGRESS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, *launcher, "-m", "safetypairs", *cli_args, "--out", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    began: dict[int, float] = {}
    tail: list[str] = []
    for line in proc.stderr:
        match = RANK_LINE.search(line)
        if match:
            began[int(match.group(1))] = time.perf_counter() - t0
        tail = (tail + [line])[-20:]
    if proc.wait() != 0 or len(began) != processes:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}, ranks logged {sorted(began)}):\n{''.join(tail)}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    compute, steady = critical_path(json.loads((out / "run.json").read_text()))
    startup = max(began.values())
    parts = runner_parts(out)
    return {"wall": wall, "startup": startup, "compute": compute, "steady": steady, "tail": wall - startup - compute,
            "write": parts["write"], "merge": parts["merge"], "finalize": parts["finalize"], "cpu": cpu}


def scaling(cli_args: Sequence[str], work: Path, rounds: int, name: str) -> dict[str, float]:
    """The CLI as 1 process and as 2 torchrun processes (1 thread each), interleaved over ``rounds``;
    prints every round and the medians; returns the median speed-ups."""
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for r in range(rounds):
        for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
            runs[processes].append(launch(cli_args, work / f"{name}-{processes}p-{r}", processes))
    print(f"{name} CLI, 1 process vs torchrun --nproc_per_node 2 (OMP_NUM_THREADS=1), {rounds} interleaved rounds:")
    for processes, results in runs.items():
        for key in ("wall", "startup", "compute", "steady", "tail", "write", "merge", "finalize", "cpu"):
            values = [res[key] for res in results]
            print(f"  {processes} proc {key:<8} s/round {' '.join(f'{v:6.2f}' for v in values)}   "
                  f"median {statistics.median(values):6.2f} s")
    speed = {}
    for key, goal in (("compute", 1.6), ("steady", 1.6), ("wall", None)):
        # steady is 0 when every rank has one chunk (nothing after the model loading): no ratio then
        ratios = [a[key] / b[key] if b[key] else float("nan") for a, b in zip(runs[1], runs[2])]
        speed[key] = statistics.median(ratios)
        print(f"  speed-up {key:<8} per round {' '.join(f'{x:.2f}' for x in ratios)}   median {speed[key]:.2f}x"
              + (f" (goal >= {goal}x)" if goal else ""))
    speed["startup_1p"] = statistics.median(res["startup"] for res in runs[1])
    speed["startup_2p"] = statistics.median(res["startup"] for res in runs[2])
    return speed
