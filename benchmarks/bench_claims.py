"""Benchmark chunk claiming: 3 ranks (``torchrun --nproc_per_node 3``) on the shared runner, one of them 3x slower.

    OMP_NUM_THREADS=1 python benchmarks/bench_claims.py [--chunks 60] [--seconds 0.2] [--factor 3]

Each chunk is one row of `tests/runner_job.py`'s toy stage (a seeded k-means) plus a sleep of ``--seconds``, on rank 2
``--factor`` times as long (a slower GPU), written like every chunk (parquet + marker). The ranks claim chunks as they
go. From the run: each chunk's seconds (select + compute + write, ``run.json``), which rank computed it (the claims
``run.json`` keeps) and, per chunk, when its compute began and ended (logged by the job), so

- claimed wall = the first chunk's start until rank 0 holds every chunk (the merged data file's time less the merge:
  ranks idle or waiting, the last chunk's write and rank 0 noticing it included);
- ideal share = the chunks / the ranks' summed speeds (each rank's speed: 1 / its mean seconds per chunk), the wall
  if the work divided perfectly;
- contiguous wall = the busiest rank's seconds had each rank got its third of the chunks up front in one run
  (`chunks.chunk_ranges`, as the runner dealt them before it claimed them), at its measured seconds per chunk.

Goal: claimed wall <= 1.2x the ideal share (contiguous assignment: (2 + 1/factor) x factor / 3, 2.33x for 3x).
Start-up (torch, datasets imports in each process) is printed apart; the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)]
RANKS, SLOW_RANK = 3, 2
TIMES = "times"  # beside the run folder: one JSON line per chunk (rank, chunk, start, end), one file per rank


def job(out: Path, chunks: int, seconds: float, factor: float) -> None:
    """One rank of the benchmark's run (under torchrun): the toy stage, one row per chunk, each chunk timed."""
    from runner_job import compute, toy_rows

    from safetypairs.engine.runner import RunConfig, run_stage, session

    rank = int(os.environ.get("RANK", "0"))
    inner = compute(0.0, seconds, SLOW_RANK, factor)
    log = out.with_name(TIMES) / f"rank-{rank}.jsonl"
    log.parent.mkdir(exist_ok=True)

    def timed(rows, device):
        start = time.time()
        result = inner(rows, device)
        with log.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"rank": rank, "chunk": int(rows[0]["row_id"][1:]), "start": start,
                                     "end": time.time()}) + "\n")
        return result

    with session("cpu"):
        run_stage(toy_rows(chunks), timed, stage="claims", settings={"seconds": seconds, "factor": factor},
                  run=RunConfig(out, chunk_size=1), device="cpu")


def measure(folder: Path, chunks: int, seconds: float, factor: float) -> dict[str, float]:
    """Run the job under torchrun; the claimed wall, the ideal share and the contiguous wall (see the module)."""
    from harness import load_line

    from safetypairs.engine.chunks import chunk_ranges

    out = folder / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", SAFETYPAIRS_NO_PROGRESS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS), __file__,
           "--job", str(out), "--chunks", str(chunks), "--seconds", str(seconds), "--factor", str(factor)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    command_wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"the 3-rank run failed:\n{proc.stderr[-3000:]}")
    meta = json.loads((out / "run.json").read_text(encoding="utf-8"))
    chunk_seconds = {int(c): sum(s.values()) for c, s in meta["timings"]["chunk_seconds"].items()}
    ranks = {int(c): rank for c, rank in meta["timings"]["chunk_ranks_last_run"].items()}
    times = [json.loads(line) for path in sorted((folder / TIMES).glob("rank-*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(t["chunk"] for t in times) == list(range(chunks)) and all(ranks[t["chunk"]] == t["rank"] for t in times)
    per_rank: dict[int, list[float]] = defaultdict(list)
    for chunk, rank in ranks.items():
        per_rank[rank].append(chunk_seconds[chunk])
    mean = {rank: statistics.mean(values) for rank, values in per_rank.items()}
    ideal = chunks / sum(1 / m for m in mean.values())
    contiguous = max(len(chunk_ranges(chunks, 1, rank, RANKS)) * mean[rank] for rank in mean)
    # until rank 0 holds every chunk: the merged file's time less the merge (the last write and rank 0 noticing it in)
    merged = max(path.stat().st_mtime for path in (out / "data").glob("*.parquet"))
    claimed = merged - meta["timings"]["rank0_seconds"]["merge"] - min(t["start"] for t in times)
    start = min(t["start"] for t in times) - t0
    print(f"3 ranks, rank {SLOW_RANK} {factor:g}x slower, {chunks} chunks of {seconds:g} s sleep + a k-means row "
          f"({load_line()})")
    print("  chunks computed per rank (claimed): " + ", ".join(
        f"rank {r} {len(per_rank[r])} at {mean[r]:.3f} s/chunk" for r in sorted(per_rank))
          + f"; contiguous would give {', '.join(str(len(chunk_ranges(chunks, 1, r, RANKS))) for r in range(RANKS))}")
    print(f"  claimed wall / ideal share: {claimed:.2f} s / {ideal:.2f} s = {claimed / ideal:.2f}x (goal <= 1.2x)   "
          f"contiguous wall / ideal share: {contiguous:.2f} s / {ideal:.2f} s = {contiguous / ideal:.2f}x")
    print(f"  the command: {command_wall:.1f} s wall, of it {start:.1f} s start-up before the first chunk")
    return {"claimed": claimed, "ideal": ideal, "contiguous": contiguous}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=60, help="chunks of one row each")
    parser.add_argument("--seconds", type=float, default=0.2, help="sleep per chunk on a fast rank")
    parser.add_argument("--factor", type=float, default=3.0, help="how much slower the slow rank is")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # one rank of the run (torchrun starts it)
    args = parser.parse_args()
    if args.job is not None:
        job(args.job, args.chunks, args.seconds, args.factor)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(tmp), args.chunks, args.seconds, args.factor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
