"""The benchmarks under benchmarks/ still run: each, at its smallest size, exits 0 and prints its ratio lines.

Benchmarks are run by hand and print measured ratios; nothing else imports them, so an API change can break
one silently (two had broken before this test). The numbers printed here are not checked: no timing is
asserted, only that each benchmark runs end to end and reports what it measures.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (script and its smallest arguments, a line every full report contains)
SMOKE = {
    "bench_validate.py": (["--quick", "--n", "16", "--rounds", "1", "--skip-scaling"], "validate overhead"),
    "bench_evaluate.py": (["--quick", "--n", "16", "--rounds", "1", "--skip-scaling"], "ratio"),
    "bench_generate.py": (["--quick", "--n", "8", "--rounds", "1", "--skip-scaling"], "ratio"),
    "bench_release.py": (["--n", "8", "--factor", "2", "--size", "96"], "ratio"),
    "bench_hostile.py": ([], "peak RSS"),
}
# Not here: bench_embed.py (no smaller size than its ~1 minute) and bench_review.py (a browser session per size).


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_its_smallest_size(script, tmp_path):
    args, expected = SMOKE[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    assert expected in proc.stdout, f"{script} printed no {expected!r} line:\n{proc.stdout[-2000:]}"
