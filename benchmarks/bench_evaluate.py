"""Benchmark: metrics over 3,020 images x 1,000 bootstrap resamples, and guard overhead vs a bare loop.

Run: OMP_NUM_THREADS=2 PYTHONPATH=src:tests python benchmarks/bench_evaluate.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("src", "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")


def bench_metrics(repeats: int = 3) -> float:
    from safetypairs.metrics import compute_metrics

    rng = np.random.default_rng(0)
    n_pairs = 1510
    ref = np.tile(["unsafe", "safe"], n_pairs)
    pred = np.where(rng.random(2 * n_pairs) < 0.8, ref, np.where(ref == "safe", "unsafe", "safe"))
    pred[rng.random(2 * n_pairs) < 0.03] = "unknown"
    kwargs = dict(
        pair_ids=np.repeat(np.arange(n_pairs), 2).astype(str).tolist(),
        categories=[f"O{i % 9 + 1}" for i in np.repeat(np.arange(n_pairs), 2)],
        scores=(rng.random(2 * n_pairs) + 0.5 * (ref == "unsafe")).tolist(),
        similarity={"changed_fraction": np.repeat(rng.random(n_pairs), 2).tolist()},
        n_bootstrap=1000,
    )
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compute_metrics(pred.tolist(), ref.tolist(), **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def bench_guard_overhead(n_images: int = 96, batch_size: int = 8) -> tuple[float, float]:
    """Seconds for run_evaluate's guard pass vs a bare loop calling the same VLM on the same batches."""
    from datasets import Dataset
    from PIL import Image
    from tiny_models import build_tiny_vlm

    from safetypairs.evaluate import EvaluateConfig, predict
    from safetypairs.policy import load_policy
    from safetypairs.registry import load_backend
    from safetypairs.schema import IMAGE_FEATURES

    path = build_tiny_vlm(Path(tempfile.mkdtemp()) / "vlm", image_size=224)
    spec = f"hf-vlm:{path},max_new_tokens=8"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(n_images)]
    rows = {"image": images, "label": [i % 2 for i in range(n_images)], "category": ["O1"] * n_images,
            "pair_id": [f"p{i // 2}" for i in range(n_images)], "role": ["original", "edited"] * (n_images // 2)}
    dataset = Dataset.from_dict(rows, features=IMAGE_FEATURES)
    guard, policy = load_backend("guards", spec, "cpu"), load_policy("llavaguard")
    guard.classify(images[:batch_size], ["O1"] * batch_size, policy)  # warm up
    start = time.perf_counter()
    for i in range(0, n_images, batch_size):
        guard.classify(images[i:i + batch_size], ["O1"] * len(images[i:i + batch_size]), policy)
    bare = time.perf_counter() - start
    start = time.perf_counter()
    predict(dataset, EvaluateConfig(guards=(spec,), device="cpu", batch_size=batch_size))
    staged = time.perf_counter() - start
    return bare, staged


def main() -> None:
    import datasets

    datasets.disable_progress_bars()
    seconds = bench_metrics()
    print(f"metrics: 3,020 images, 1,000 bootstrap resamples over pairs (+9 categories): {seconds:.3f} s (goal < 2 s)")
    bare, staged = bench_guard_overhead()
    print(f"guard inference, tiny VLM, 96 images 224px: bare loop {bare:.2f} s, evaluate stage {staged:.2f} s, "
          f"ratio {staged / bare:.3f}x (goal <= 1.10x)")


if __name__ == "__main__":
    main()
