"""Benchmark evaluation: bootstrap metrics at release size, guard overhead vs a bare loop, and 2 processes vs 1.

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py [--quick]

1. Metrics: 3,020 images x 1,000 bootstrap resamples over pairs (goal < 2 s).
2. Overhead: a tiny random Llava guard (``hf-vlm:<path>``, 224 px, answering safe/unsafe:
   `tiny_models.build_tiny_answering_vlm`)
   over the ``images`` config of a
   release folder made of real skimage photos. The bare loop reads the same parquet rows, decodes the
   same image bytes with `load_image` and calls the same ``classify`` on the same batches; against it
   run `predict` (in-process `map_stage`) and `evaluate_run` (the shared runner, the CLI's path:
   chunks + parquet + merge, then scoring without bootstrap and the report). Rounds are interleaved
   (order rotates); the ratio is the median of the per-round ratios (goal <= 1.10x); then where the runner's
   time goes.
3. Scaling: ``safetypairs evaluate`` as 1 process and under ``torchrun --nproc_per_node 2`` (one thread
   each); wall clock, start-up and compute seconds apart (goal >= 1.6x compute).

Timings are side by side in one run; on a shared machine other processes distort them (the load
average is printed with them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")

from harness import DecodeClock, interleaved, load_line, print_overhead, print_runner_parts, scaling  # noqa: E402

SIDE = 224
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "stereo_motorcycle")


def bench_metrics(repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of `compute_metrics` on a release-sized prediction table."""
    from safetypairs.evaluate.metrics import compute_metrics

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


def write_release(n_images: int, folder: Path) -> Path:
    """A release folder with only an ``images`` config: ``n_images`` crops of real photos, one pair per two."""
    from datasets import Dataset
    from PIL import ImageDraw

    from safetypairs.engine.datafiles import write_parquet
    from safetypairs.schema import IMAGE_FEATURES, image_id
    from safetypairs.sources import demo_photo

    rng = np.random.default_rng(0)
    rows = {"image": [], "label": [], "category": [], "pair_id": [], "role": [], "image_id": [], "source_id": [],
            "image_digest": []}
    for i in range(n_images):
        photo = demo_photo(PHOTOS[(i // 2) % len(PHOTOS)])
        x, y = rng.integers(0, photo.width - SIDE), rng.integers(0, photo.height - SIDE)
        image = photo.crop((x, y, x + SIDE, y + SIDE))
        if i % 2 == 0:
            ImageDraw.Draw(image).text((8, 8), f"BAD {i // 2}", fill=(255, 0, 0))
        rows["image"].append(image)
        rows["label"].append(1 - i % 2)
        rows["category"].append(f"O{(i // 2) % 9 + 1}")
        rows["pair_id"].append(f"p{i // 2:05d}")
        rows["role"].append("original" if i % 2 == 0 else "edited")
        rows["image_id"].append(image_id(rows["pair_id"][-1], rows["role"][-1]))
        rows["source_id"].append(f"s{i // 2:05d}")
        rows["image_digest"].append(None)
    (folder / "data" / "images").mkdir(parents=True, exist_ok=True)
    write_parquet(Dataset.from_dict(rows, features=IMAGE_FEATURES), folder / "data" / "images" / "test-00000.parquet")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: images\n  data_files:\n  - split: test\n"
                                      "    path: data/images/test-*.parquet\n---\n")
    return folder


def overhead(release: Path, spec: str, work: Path, rounds: int, batch_size: int, chunk_size: int) -> None:
    """Bare loop vs `predict` vs `evaluate_run`, interleaved rounds on the same rows."""
    import pyarrow.parquet as pq

    from safetypairs.engine.datafiles import load_release
    from safetypairs.evaluate.stage import EvaluateConfig, evaluate_run, predict
    from safetypairs.images import load_image
    from safetypairs.policy import load_policy
    from safetypairs.backends.registry import load_backend
    from safetypairs.engine.runner import RunConfig
    from safetypairs.engine.stage import undecoded

    images = load_release(str(release), "images", "auto")
    written = sum(pq.read_metadata(f).num_rows for f in release.glob("data/images/*.parquet"))
    assert len(images) == written, f"loaded {len(images)} images of {written}: a stale datasets cache"
    config = EvaluateConfig(guards=(spec,), device="cpu", batch_size=batch_size, n_bootstrap=0)
    guard, policy = load_backend("guards", spec, "cpu"), load_policy(config.policy)

    def bare(_: int) -> None:
        for batch in undecoded(images).iter(batch_size=batch_size):
            guard.classify([load_image(cell) for cell in batch["image"]], batch["category"], policy)

    def mapped(_: int) -> None:
        predict(images, config)

    decode = DecodeClock()

    def runner(r: int) -> None:
        with decode:
            evaluate_run(str(release), config, RunConfig(out=work / f"evaluate-{r}", chunk_size=chunk_size))

    bare(0)  # warm-up: model load, first-call allocations
    paths = {"bare loop": bare, "predict (map_stage)": mapped, "evaluate_run (runner)": runner}
    seconds = interleaved(paths, rounds)
    print_overhead(f"guard overhead, tiny Llava {SIDE} px, {len(images)} images, batch {batch_size}, chunk {chunk_size}, "
                   f"{rounds} interleaved rounds ({load_line()}):", seconds, "bare loop", 1.10)
    print_runner_parts("evaluate_run (runner)", [work / f"evaluate-{r}" for r in range(rounds)], seconds,
                       decode.seconds, "bare loop", "predict (map_stage)")


def main() -> None:
    """Run the three benchmarks and print their numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (a smoke run)")
    parser.add_argument("--n", type=int, default=None, help="images (default: 192, quick: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--skip-scaling", action="store_true", help="no 1 vs 2 process CLI runs")
    args = parser.parse_args()
    n = args.n or (64 if args.quick else 192)
    import datasets
    import torch
    from tiny_models import build_tiny_answering_vlm

    datasets.disable_progress_bars()
    datasets.disable_caching()  # a repeated map recomputes instead of loading the previous round's result
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"bench_evaluate ({load_line()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    seconds = bench_metrics()
    print(f"metrics: 3,020 images, 1,000 bootstrap resamples over pairs (+9 categories): {seconds:.3f} s (goal < 2 s)")
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        work = Path(tmp)
        spec = f"hf-vlm:{build_tiny_answering_vlm(work / 'vlm', image_size=SIDE)},max_new_tokens=8"
        # a unique folder name: `datasets` caches a local folder by its name and README, not its files
        release = write_release(n, Path(tempfile.mkdtemp(prefix="release-", dir=work)))
        overhead(release, spec, work, args.rounds, batch_size=8, chunk_size=32)
        if not args.skip_scaling:
            scaling(["evaluate", "--dataset", str(release), "--guard", spec, "--device", "cpu", "--batch-size", "8",
                     "--chunk-size", "16", "--bootstrap", "100"], work, args.rounds, "evaluate")
    print(f"done ({load_line()})")


if __name__ == "__main__":
    main()
