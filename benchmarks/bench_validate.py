"""Benchmark pair validation: overhead vs a bare loop of the same metric calls, 2 processes vs 1, peak memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_validate.py [--quick] [--memory 1000 10000]

Pairs are 256 px crops of real skimage photos with a pasted patch, written to an Arrow dataset on
disk first (``save_to_disk``) so every path streams them from disk. Encoders are offline stand-ins
(LPIPS AlexNet with a random backbone, a tiny random ``hf-clip`` model loaded with from_pretrained).

1. Overhead: a bare loop (decode the same cells, the same change mask, SSIM/PSNR, LPIPS and CLIP calls on
   the same batches) vs `run_validate` (in-process `map_stage`) vs `validate_run` (the shared runner, the
   CLI's path: chunks + parquet + merge), interleaved rounds in one process with warm models; the ratio
   is the median of the per-round ratios (goal <= 1.05x).
2. Scaling: ``safetypairs validate`` as 1 process and under ``torchrun --nproc_per_node 2`` (one thread
   each); wall clock, start-up and compute seconds apart (goal >= 1.6x compute).
3. Memory (``--memory N ...``): each point runs `validate_pairs` in a fresh subprocess that reports its
   own peak RSS (without LPIPS, whose CPU cost would make 10,000 pairs take ~30 min on 2 cores).

Timings are side by side in one run; on a shared machine other processes distort them (the load
average is printed with them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")

from harness import interleaved, load_line, print_overhead, scaling  # noqa: E402

SIDE = 256
LPIPS_SPEC = "lpips:alex,pnet_rand=true"


def _tiny_clip_spec(folder: Path) -> str:
    from tiny_models import build_tiny_hf_clip

    return f"hf-clip:{build_tiny_hf_clip(folder)}"


def write_pairs(n: int, out: Path) -> Path:
    """Write ``n`` (original, edited) 256 px pairs to ``out`` with ``save_to_disk``; 1,000 distinct pairs
    are generated and repeated for larger ``n`` (the point is streaming, not content)."""
    from datasets import Dataset, Features, Image, concatenate_datasets

    from safetypairs import schema as S
    from safetypairs.sources import demo_photo

    rng = np.random.default_rng(0)
    photos = [np.asarray(demo_photo(name)) for name in ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")]

    def rows(count: int):
        from PIL import Image as PILImage

        for _ in range(count):
            photo = photos[rng.integers(len(photos))]
            y, x = rng.integers(0, photo.shape[0] - SIDE), rng.integers(0, photo.shape[1] - SIDE)
            crop = photo[y:y + SIDE, x:x + SIDE].copy()
            edited = crop.copy()
            py, px, size = rng.integers(0, SIDE - 64), rng.integers(0, SIDE - 64), rng.integers(16, 64)
            edited[py:py + size, px:px + size] = rng.integers(0, 256, 3)
            yield {S.IMAGE: PILImage.fromarray(crop), S.EDITED_IMAGE: PILImage.fromarray(edited)}

    features = Features({S.IMAGE: Image(), S.EDITED_IMAGE: Image()})
    base = Dataset.from_generator(rows, gen_kwargs={"count": min(n, 1000)}, features=features,
                                  cache_dir=str(out.parent / "gen-cache"))
    full = concatenate_datasets([base] * (n // len(base)) + [base.select(range(n % len(base)))])
    full.save_to_disk(str(out))
    return out


def bare_loop(data, lpips_spec: str | None, clip_spec: str, batch_size: int) -> int:
    """The same metric calls as `ValidateTransform`, in a plain loop that keeps only the numbers."""

    from safetypairs import change
    from safetypairs import schema as S
    from safetypairs.images import load_image
    from safetypairs.registry import load_backend
    from safetypairs.stage import undecoded
    from safetypairs.validate import ValidateConfig

    params = ValidateConfig().mask_params
    lpips_enc = load_backend("encoders", lpips_spec, "cpu") if lpips_spec else None
    clip_enc = load_backend("encoders", clip_spec, "cpu")
    results = []
    for batch in undecoded(data).iter(batch_size=batch_size):
        a = [change.to_float(load_image(c)) for c in batch[S.IMAGE]]
        b = [change.to_float(load_image(c)) for c in batch[S.EDITED_IMAGE]]
        masks = [change.change_mask(x, y, params) for x, y in zip(a, b)]
        for x, y, m in zip(a, b, masks):
            outside = ~m.region
            results.append((m.changed_fraction, m.spread(), change.bbox(m.changed),
                            change.masked_mean(change.ssim_map(x, y), outside), change.psnr_where(x, y, outside),
                            change.masked_mean(m.delta_e, m.changed)))
        for dist, m in zip(lpips_enc.distance_maps(a, b) if lpips_enc else [], masks):
            results.append((change.masked_mean(dist, ~m.region), change.masked_mean(dist, m.changed)))
        emb = clip_enc.embed([change.blank_region(x, m.region) for x, m in zip(a + b, masks + masks)])
        results.append(np.sum(emb[: len(a)] * emb[len(a):], axis=1))
    return len(results)


def overhead(path: Path, clip_spec: str, work: Path, rounds: int, batch_size: int, chunk_size: int) -> None:
    """Bare loop vs `run_validate` vs `validate_run`, interleaved rounds on the same rows (warm models)."""
    from datasets import load_from_disk

    from safetypairs.runner import RunConfig
    from safetypairs.validate import ValidateConfig, run_validate, validate_run

    data = load_from_disk(str(path))
    config = ValidateConfig(lpips=LPIPS_SPEC, clip=clip_spec, device="cpu", batch_size=batch_size)
    bare_loop(data.select(range(batch_size)), LPIPS_SPEC, clip_spec, batch_size)  # warm-up: models, first calls
    run_validate(data.select(range(batch_size)), config)
    paths = {
        "bare loop": lambda r: bare_loop(data, LPIPS_SPEC, clip_spec, batch_size),
        "run_validate (map_stage)": lambda r: run_validate(data, config),
        "validate_run (runner)": lambda r: validate_run(data, config, RunConfig(out=work / f"validate-{r}",
                                                                               chunk_size=chunk_size)),
    }
    seconds = interleaved(paths, rounds)
    print_overhead(f"validate overhead, {len(data)} pairs at {SIDE} px ({LPIPS_SPEC} + tiny hf-clip), batch {batch_size}, "
                   f"chunk {chunk_size}, {rounds} interleaved rounds ({load_line()}):", seconds, "bare loop", 1.05)


def _memory_child(path: str, batch_size: int) -> None:
    """One `validate_pairs` run (SSIM/PSNR + tiny CLIP) in this process; prints its peak RSS as JSON."""
    import datasets
    from datasets import load_from_disk

    from safetypairs.validate import validate_pairs

    datasets.disable_progress_bars()
    clip_spec = _tiny_clip_spec(Path(path).parent / "clip")
    peak_anon = [0.0]
    done = threading.Event()

    def sample() -> None:  # anonymous memory only: memory-mapped Arrow pages are file-backed, reclaimable
        while not done.wait(0.1):
            peak_anon[0] = max(peak_anon[0], _rss_anon_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    validate_pairs(load_from_disk(path), clip=clip_spec, device="cpu", batch_size=batch_size)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb, "peak_anon_mb": peak_anon[0]}))


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory(paths: dict[int, Path], batch_size: int) -> None:
    """Peak RSS of `validate_pairs` at each size, each in a fresh subprocess."""
    print("peak RSS of validate_pairs, SSIM/PSNR + tiny hf-clip (fresh process each, data from disk):")
    for n, path in paths.items():
        cmd = [sys.executable, __file__, "--memory-child", str(path), "--batch-size", str(batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {n:6d} pairs: peak RSS {run['peak_rss_mb']:7.1f} MB (incl. mmapped Arrow pages), "
              f"peak anonymous {run['peak_anon_mb']:7.1f} MB  ({run['seconds']:.1f} s, {n / run['seconds']:.1f} pairs/s)")


def main() -> None:
    """Run the benchmarks and print their numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pairs (a smoke run)")
    parser.add_argument("--n", type=int, default=None, help="pairs for overhead and scaling (default: 256, quick: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--memory", type=int, nargs="*", default=[], help="pair counts for peak RSS (e.g. 1000 10000)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: n / 8)")
    parser.add_argument("--skip-scaling", action="store_true", help="no 1 vs 2 process CLI runs")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.batch_size)
        return
    n = args.n or (64 if args.quick else 256)
    chunk_size = args.chunk_size or max(1, n // 8)
    import datasets
    import torch

    datasets.disable_progress_bars()
    datasets.disable_caching()  # a repeated map recomputes instead of loading the previous round's result
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"bench_validate ({load_line()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        work = Path(tmp)
        paths = {k: write_pairs(k, work / f"pairs-{k}") for k in sorted({n, *args.memory})}
        clip_spec = _tiny_clip_spec(work / "clip")
        overhead(paths[n], clip_spec, work, args.rounds, args.batch_size, chunk_size)
        if not args.skip_scaling:
            scaling(["validate", str(paths[n]), "--lpips", LPIPS_SPEC, "--clip", clip_spec, "--device", "cpu",
                     "--batch-size", str(args.batch_size), "--chunk-size", str(chunk_size)], work, args.rounds, "validate")
        if args.memory:
            memory({k: paths[k] for k in args.memory}, args.batch_size)
    print(f"done ({load_line()})")


if __name__ == "__main__":
    main()
