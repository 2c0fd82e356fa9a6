"""Deterministic test classifiers that can be slowed down, and a CLI entry that registers them.

``python tests/slow_backends.py <safetypairs CLI args>`` runs the CLI with the judge/guard ``slow`` registered;
``SLOW_BACKEND_DELAY`` seconds of sleep per call on every image batch but the first row's, so a test can
kill a run after its first chunk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from safetypairs.backends.base import Verdict
from safetypairs.schema import SAFE, UNSAFE


class SlowClassifier:
    """``slow``: unsafe when the image's green channel dominates; its score is that channel's share."""

    OPTIONS: dict[str, str] = {}

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **_: Any) -> SlowClassifier:
        return cls()

    def classify(self, images: list, categories: list, policy: Any) -> list[Verdict]:
        delay = float(os.environ.get("SLOW_BACKEND_DELAY", "0"))
        if delay and os.path.exists(os.environ.get("SLOW_BACKEND_FLAG", "")):
            time.sleep(delay)
        verdicts = []
        for image in images:
            means = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
            share = float(means[1] / max(means.sum(), 1e-9))
            verdicts.append(Verdict(UNSAFE if share > 0.36 else SAFE, share, "green share", f"{share:.6f}"))
        if delay:  # from the first call on, later calls sleep
            open(os.environ["SLOW_BACKEND_FLAG"], "a").close()
        return verdicts


def register() -> None:
    """Add ``slow`` to the judges and guards registries."""
    from safetypairs.backends.registry import REGISTRY

    for kind in ("judges", "guards"):
        REGISTRY[kind]["slow"] = "slow_backends:SlowClassifier"


ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    paths = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=paths, **extra)


def _cli(args: list[str], launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    script = [str(ROOT / "tests" / "slow_backends.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, *script] if launcher else [sys.executable, *script]
    proc = subprocess.run([*cmd, "-q", *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_sharding_and_resume(make_args: Callable[[Path, int], list[str]], root: Path,
                              table: Callable[[Path], Any]) -> None:
    """A stage's CLI run == another chunk size == 2 processes == SIGKILL after the first chunk + restart.

    Args:
        make_args: ``(out folder, chunk size) -> CLI args``.
        root: a scratch folder.
        table: ``out folder -> the table to compare`` (value for value, pixel for pixel).
    """
    from safetypairs.engine.folders import partial_dir, read_json

    _cli(make_args(root / "ref", 2))
    reference = table(root / "ref")
    _cli(make_args(root / "chunk3", 3))
    assert table(root / "chunk3").equals(reference)
    _cli(make_args(root / "two", 2), launcher=("--standalone", "--nproc_per_node", "2"))
    assert table(root / "two").equals(reference)
    killed = root / "killed"
    env = _env(SLOW_BACKEND_DELAY="60", SLOW_BACKEND_FLAG=str(root / "flag"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_backends.py"), "-q", *make_args(killed, 2)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = partial_dir(killed) / "chunks" / "chunk-000000.json"
    deadline = time.time() + 120
    while time.time() < deadline and not first.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not killed.exists()
    _cli(make_args(killed, 2))
    assert read_json(killed / "run.json")["timings"]["chunks_reused_last_run"] == 1
    assert table(killed).equals(reference)


if __name__ == "__main__":
    register()
    from safetypairs.cli import main

    sys.exit(main(sys.argv[1:]))
