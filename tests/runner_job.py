"""A toy stage on the shared runner, for the runner's process tests (torchrun, SIGKILL, locks).

``python tests/runner_job.py OUT [--chunk-size N] [--rows N] [--delay S] [--sleep S --slow-rank R --slow-factor F]
[--passes]``: each row's output is a pure function of the row (an OpenCV k-means seeded from the row, so any global
RNG use would show); with ``--delay`` every chunk after the first sleeps, so a test can kill the run after its first
chunk; with ``--sleep`` every chunk sleeps that long, on rank ``--slow-rank`` ``--slow-factor`` times as long (a slow
GPU); with ``--passes`` the columns are computed in two `runner.Passes` (as evaluate runs guard-major). Each process
counts the rows it computes as a served model counts requests (`usage.Usage`), so a test can check that rank 0 adds
up every rank's counts in ``run.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import cv2
import numpy as np
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from safetypairs.engine.runner import Passes, RunConfig, run_stage, session
from safetypairs.engine.folders import OutputDirError
from safetypairs.usage import Usage

COMPUTED = Usage()  # rows this process computed, one "request" and one "answer" each


def toy_rows(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)) for _ in range(n)]
    return Dataset.from_dict({"row_id": [f"r{i:03d}" for i in range(n)], "image": images},
                             features=Features({"row_id": Value("string"), "image": Image()}))


def compute(delay: float, sleep: float = 0.0, slow_rank: int = -1, slow_factor: float = 1.0):
    rank = int(os.environ.get("RANK", "0"))

    def run(rows: Dataset, device: str):
        if delay and rows[0]["row_id"] != "r000":
            time.sleep(delay)
        time.sleep(sleep * (slow_factor if rank == slow_rank else 1.0))
        centres, labels = [], []
        for i, row in enumerate(rows):
            seed = int(row["row_id"][1:])
            cv2.setRNGSeed(seed)
            pixels = np.asarray(row["image"], dtype=np.float32).reshape(-1, 3)
            criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 1.0)
            _, _, c = cv2.kmeans(pixels, 2, None, criteria, 1, cv2.KMEANS_RANDOM_CENTERS)
            centres.append(float(np.sort(c[:, 0])[0]))
            labels.append("odd" if seed % 2 else "even")
        COMPUTED.requests, COMPUTED.answers = COMPUTED.requests + len(rows), COMPUTED.answers + len(rows)
        out = rows.add_column("centre", centres).add_column("parity", labels)
        return out, {"toy": {"odd": labels.count("odd"), "even": labels.count("even")}}
    return run


def passes(whole) -> Passes:
    """``whole``'s columns in two passes: ``centre`` first, then ``parity`` (each pass computes the chunk again and
    keeps its own column, so the joined rows equal ``whole``'s)."""
    def piece(rows: Dataset, device: str, name: str):
        out, statuses = whole(rows, device)
        return out.remove_columns("parity" if name == "centre" else "centre"), statuses if name == "parity" else {}
    return Passes(("centre", "parity"), piece, lambda name: None)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--rows", type=int, default=7)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slow-factor", type=float, default=3.0)
    parser.add_argument("--passes", action="store_true")
    args = parser.parse_args()
    whole = compute(args.delay, args.sleep, args.slow_rank, args.slow_factor)
    try:
        with session("cpu"):
            summary = run_stage(toy_rows(args.rows), passes(whole) if args.passes else whole, stage="toy",
                                settings={"version": 1}, run=RunConfig(args.out, chunk_size=args.chunk_size),
                                device="cpu", usage=lambda: {("toy", "rows"): Usage() + COMPUTED})
    except OutputDirError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if summary is not None:
        sys.stdout.write(summary.render() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
