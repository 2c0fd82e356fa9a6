"""A toy stage on the shared runner, for the runner's process tests (torchrun, SIGKILL, locks).

``python tests/runner_job.py OUT [--chunk-size N] [--rows N] [--delay S]``: each row's output is a pure
function of the row (an OpenCV k-means seeded from the row, so any global RNG use would show); with
``--delay`` every chunk after the first sleeps, so a test can kill the run after its first chunk. Each process
counts the rows it computes as a served model counts requests (`usage.Usage`), so a test can check that rank 0
adds up every rank's counts in ``run.json``.
"""

from __future__ import annotations

import argparse
import sys
import time

import cv2
import numpy as np
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from safetypairs.engine.runner import RunConfig, run_stage, session
from safetypairs.engine.folders import OutputDirError
from safetypairs.usage import Usage

COMPUTED = Usage()  # rows this process computed, one "request" and one "answer" each


def toy_rows(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)) for _ in range(n)]
    return Dataset.from_dict({"row_id": [f"r{i:03d}" for i in range(n)], "image": images},
                             features=Features({"row_id": Value("string"), "image": Image()}))


def compute(delay: float):
    def run(rows: Dataset, device: str):
        if delay and rows[0]["row_id"] != "r000":
            time.sleep(delay)
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--rows", type=int, default=7)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    try:
        with session("cpu"):
            summary = run_stage(toy_rows(args.rows), compute(args.delay), stage="toy",
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
