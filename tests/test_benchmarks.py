"""Every benchmark under benchmarks/ still runs: each, with every part at its smallest size, exits 0 and prints the
lines of each part. The 1 vs 2 process CLI parts of bench_validate and bench_generate run with the slow tests;
bench_evaluate's runs here.

Benchmarks are run by hand and print measured ratios; nothing else imports them, so an API change can break
one silently (bench_evaluate's 2-process part broke unseen while only in-process parts were run here). The
numbers printed here are not checked: no timing is asserted, only that every part runs end to end and reports
what it measures. The benchmarks run two at a time (each keeps about one core busy), longest first.
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALING = "1 process vs torchrun --nproc_per_node 2"
# script: (its smallest arguments running every part, a line each part prints); longest first
SMOKE = {
    "bench_validate.py": (["--quick", "--n", "16", "--rounds", "1", "--memory", "16", "--control", "4", "--vae", "32",
                           "--skip-scaling"],
                          ["validate overhead", "where validate_run (runner) goes", "peak RSS of validate_pairs",
                           "control-relative vs plain", "VAE round trip"]),
    "bench_generate.py": (["--n", "8", "--chunk-size", "2", "--rounds", "1", "--skip-scaling"],
                          ["generate overhead", "where generate_run (runner) goes"]),
    "bench_hostile.py": (["--n", "4"], ["generate  peak RSS", "validate  peak RSS", "the same bytes again"]),
    "bench_evaluate.py": (["--quick", "--n", "16", "--rounds", "1"],
                          ["metrics:", "guard overhead", "where evaluate_run (runner) goes", SCALING]),
    "bench_claims.py": (["--chunks", "9", "--seconds", "0.05"],
                        ["chunks computed per rank", "claimed wall / ideal share", "contiguous wall / ideal share"]),
    "bench_review.py": (["--n", "2", "--factor", "2", "--size", "64", "--decisions", "1"],
                        ["first pair on screen", "memory ratio", "per image"]),
    "bench_embed.py": (["--quick"], ["bare loop", "sample-efficiency sweep", "second run"]),
    "bench_release.py": (["--n", "8", "--factor", "2", "--size", "96"], ["anon_peak_minus_before_mb"]),
    "calibration.py": (["--photos", "astronaut"], ["| "]),
    "bench_guards.py": (["--n", "2", "--tokens", "2", "--rounds", "1"],
                        ["LlavaGuard forwards over the prompt per image: two-pass 2, one-pass 1",
                         "LlavaGuard one pass vs two", "ShieldGemma 2 images per forward: one at a time 1, batched 2",
                         "ShieldGemma 2 batched vs one at a time"]),
    "bench_gpu.py": (["--models", "tiny-kontext", "--n", "2", "--rounds", "1", "--steps", "1", "--resolution", "16",
                      "--side", "32", "--variants", "baseline"],
                     ["bench_gpu on", "== tiny-kontext", "x baseline", "edit      baseline",
                      "generate  free instr.", "generate  keep instr."]),
    "bench_validate_host.py": (["--side", "256", "--sources", "1", "--k", "2", "--rounds", "1"],
                               ["validate host CPU per row", "where a row's host CPU goes"]),
    "bench_served.py": (["--n", "8", "--rounds", "1"],
                        ["throughput 8 in flight / 1 in flight", "rerun of a finished run", "resume after a kill at 50%",
                         "client overhead", "per request:"]),
}
# The 1 vs 2 process CLI runs of validate and generate (~40 s of CPU each: three processes start torch) run with the
# slow tests; bench_evaluate's (the cheapest, 25 s) runs here, so the shared `harness.scaling` path runs in CI.
SMOKE |= {f"{script} scaling": ([a for a in SMOKE[script][0] if a != "--skip-scaling"], [*SMOKE[script][1], SCALING])
          for script in ("bench_validate.py", "bench_generate.py")}
# over a minute even at their smallest size (bench_served: a transformers serve start-up, a killed CLI run and
# in-process evaluate runs, 98 s with the machine's two cores shared): run with the slow tests
SLOW = {"bench_served.py", "bench_validate.py scaling", "bench_generate.py scaling"}
BROWSER = ("chromium", "chromedriver")


def _skipped(script: str) -> str | None:
    if script == "bench_review.py" and not all(shutil.which(tool) for tool in BROWSER):
        return "bench_review.py needs headless chromium and chromedriver"
    return None


def _run(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script.split()[0]), *SMOKE[script][0]],
                          capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, Future]:
    """The selected benchmarks, started once for this module, two at a time."""
    chosen = {item.callspec.params["script"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {script: pool.submit(_run, script, tmp_path_factory.mktemp(Path(script).stem))
               for script in SMOKE if script in chosen and not _skipped(script)}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in SMOKE])
def test_every_part_of_a_benchmark_runs_at_its_smallest_size(script, runs):
    if reason := _skipped(script):
        pytest.skip(reason)
    proc = runs[script].result()
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    missing = [line for line in SMOKE[script][1] if line not in proc.stdout]
    assert not missing, f"{script} printed no {missing} line:\n{proc.stdout[-2000:]}"


def test_every_benchmark_is_run_here():
    scripts = {path.name for path in (ROOT / "benchmarks").glob("*.py")} - {"harness.py", "__init__.py"}
    assert scripts == {name.split()[0] for name in SMOKE}
