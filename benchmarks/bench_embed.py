"""Benchmark: the embed stage vs a bare encoder loop, the sample-efficiency sweep over cached embeddings,
and a second embed run on the same data (encoder calls counted).

Run: OMP_NUM_THREADS=2 PYTHONPATH=src:tests python benchmarks/bench_embed.py [--quick]
(``--quick``: a few images and a small sweep, a smoke run of every part.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("src", "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")

ENCODER = "open_clip:ViT-B-32/none"  # the real ViT-B/32 architecture with random weights (no download)
# images embedded (stage vs bare), batch, sweep embedding size, ks and seeds, images embedded twice
FULL = {"images": 128, "batch": 32, "dim": 768, "ks": (2, 4, 8, 16, 32, 64), "seeds": 10, "again": 64}
QUICK = {"images": 8, "batch": 4, "dim": 32, "ks": (2, 4), "seeds": 2, "again": 8}


def _photos(n: int):
    from datasets import ClassLabel, Dataset, Features, Image, Value

    from safetypairs.sources import DEMO_PHOTOS, demo_photo

    images = [demo_photo(DEMO_PHOTOS[i % len(DEMO_PHOTOS)]).resize((256, 256)).rotate(i) for i in range(n)]
    features = Features({"image": Image(), "label": ClassLabel(names=["safe", "unsafe"]), "source_id": Value("string")})
    return Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)],
                              "source_id": [f"s{i}" for i in range(n)]}, features=features)


def bench_stage_vs_bare(n: int = 128, batch_size: int = 32, repeats: int = 2) -> tuple[float, float]:
    """Seconds for `run_embed` vs a loop decoding the same cells and calling the same encoder."""
    from safetypairs.probes.embed import EmbedConfig, run_embed
    from safetypairs.images import load_image
    from safetypairs.backends.registry import load_backend
    from safetypairs.engine.stage import undecoded

    dataset = _photos(n)
    encoder = load_backend("encoders", ENCODER, "cpu")
    encoder.embed([load_image(undecoded(dataset)[0]["image"])])  # warm up
    config = EmbedConfig(encoder=ENCODER, device="cpu", batch_size=batch_size)
    stage, bare = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run_embed(dataset, config)
        stage.append(time.perf_counter() - start)
        start = time.perf_counter()
        cells = undecoded(dataset)
        for lo in range(0, n, batch_size):
            encoder.embed([load_image(c) for c in cells[lo:lo + batch_size]["image"]])
        bare.append(time.perf_counter() - start)
    return min(stage), min(bare)


def bench_sweep(dim: int = 768, ks: tuple[int, ...] = (2, 4, 8, 16, 32, 64), seeds: int = 10) -> tuple[float, int]:
    """Seconds for ``ks`` x ``seeds`` x 4 arms on cached (synthetic) embeddings (768: CLIP ViT-L/14 size)."""
    from safetypairs.identity import identity_of
    from safetypairs.probes.sample_efficiency import Labelled, SweepConfig, run_sweep

    rng = np.random.default_rng(0)

    def rows(n, prefix):
        y = np.arange(n) % 2
        x = rng.normal(size=(n, dim)) + 0.3 * (2 * y - 1)[:, None] * (np.arange(dim) < 8)
        ids = [f"{prefix}{i // (2 if prefix == 'p' else 1)}" for i in range(n)]
        identity = identity_of({"source_id": ids, "image_digest": [f"{prefix}-{i}" for i in range(n)]}, prefix)
        return Labelled(x / np.linalg.norm(x, axis=1, keepdims=True), y, identity)

    base, pairs, evaluation = rows(300, "b"), rows(200, "p"), rows(600, "e")
    start = time.perf_counter()
    results = run_sweep(base, pairs, evaluation, SweepConfig(ks=ks, seeds=seeds), "ocr-text")
    return time.perf_counter() - start, len(results["runs"])


def bench_second_run(n: int = 64) -> tuple[int, int, str]:
    """Encoder images embedded by a first and a second `embed_run` on the same data and encoder."""
    from safetypairs.engine import runner
    from safetypairs.probes.embed import EmbedConfig, embed_run
    from safetypairs.backends.registry import load_backend

    encoder = load_backend("encoders", ENCODER, "cpu")
    calls = []
    original = encoder.embed
    encoder.embed = lambda images: calls.append(len(images)) or original(images)
    dataset, out = _photos(n), Path(tempfile.mkdtemp()) / "emb"
    config = EmbedConfig(encoder=ENCODER, device="cpu")
    embed_run(dataset, config, runner.RunConfig(out=out, chunk_size=32))
    first = sum(calls)
    embed_run(dataset, config, runner.RunConfig(out=out, chunk_size=32))
    return first, sum(calls) - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest size of every part (a smoke run)")
    size = QUICK if parser.parse_args().quick else FULL
    stage, bare = bench_stage_vs_bare(size["images"], size["batch"])
    print(f"embed {size['images']} images ({ENCODER}, batch {size['batch']}): stage {stage:.2f} s, bare loop {bare:.2f} s, "
          f"ratio {stage / bare:.3f} (target <= 1.05)")
    seconds, runs = bench_sweep(size["dim"], size["ks"], size["seeds"])
    print(f"sample-efficiency sweep {len(size['ks'])} k x {size['seeds']} seeds x 4 arms ({runs} probes, {size['dim']}-d): "
          f"{seconds:.2f} s (target < 10 s at 6 k x 10 seeds, 768-d)")
    first, second = bench_second_run(size["again"])
    print(f"embed_run on {size['again']} images: first run embedded {first} images, second run {second} (target 0)")


if __name__ == "__main__":
    main()
