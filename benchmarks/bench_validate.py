"""Benchmark pair validation: overhead vs a bare loop of the same metric calls, 2 processes vs 1, peak memory,
the control-relative path vs the plain one, and the VAE round trip of a tiny diffusers pipeline.

    OMP_NUM_THREADS=1 python benchmarks/bench_validate.py [--quick] [--memory 1000 10000]
    OMP_NUM_THREADS=1 python benchmarks/bench_validate.py --n 0 --control 96 --vae 128 256

Pairs are 256 px crops of real skimage photos with a pasted patch, written to an Arrow dataset on
disk first (``save_to_disk``), then into a run folder the way ``generate`` writes its candidates (every
image cell checked once and recorded in ``image_checks``): what ``safetypairs validate`` reads after
``generate``. Every path streams them from disk. Encoders are offline stand-ins (LPIPS AlexNet with a
random backbone, a tiny random ``hf-clip`` model loaded with from_pretrained).

1. Overhead: a bare loop (decode the same cells, the same change mask, SSIM/PSNR, LPIPS and CLIP calls on
   the same batches) vs `run_validate` (in-process `map_stage`) vs `validate_run` (the shared runner, the
   CLI's path: chunks + parquet + merge) on the run folder's rows, and `validate_run` on the
   ``save_to_disk`` rows (nothing recorded: the writer decodes every image cell once to check it);
   interleaved rounds in one process with warm models; the ratio is the median of the per-round ratios
   (goal <= 1.10x); then where the runner's time goes.
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

from harness import DecodeClock, interleaved, load_line, print_overhead, print_runner_parts, scaling  # noqa: E402

SIDE = 256
LPIPS_SPEC = "lpips:alex,pnet_rand=true"


def _tiny_clip_spec(folder: Path) -> str:
    from tiny_models import build_tiny_hf_clip

    return f"hf-clip:{build_tiny_hf_clip(folder)}"


def write_pairs(n: int, out: Path, control: bool = False) -> Path:
    """Write ``n`` (original, edited) 256 px pairs to ``out`` with ``save_to_disk``; 1,000 distinct pairs
    are generated and repeated for larger ``n`` (the point is streaming, not content). With ``control``,
    the edit and a control (the original) both go through a JPEG q80 round trip (an editor's fingerprint)."""
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
            row = {S.IMAGE: PILImage.fromarray(crop), S.EDITED_IMAGE: PILImage.fromarray(edited)}
            if control:
                row = {**row, S.EDITED_IMAGE: jpeg(row[S.EDITED_IMAGE], 80), S.CONTROL_IMAGE: jpeg(row[S.IMAGE], 80)}
            yield row

    from safetypairs.validate.calibrate import jpeg

    features = Features({S.IMAGE: Image(), S.EDITED_IMAGE: Image(), **({S.CONTROL_IMAGE: Image()} if control else {})})
    base = Dataset.from_generator(rows, gen_kwargs={"count": min(n, 1000)}, features=features,
                                  cache_dir=str(out.parent / "gen-cache"))
    full = concatenate_datasets([base] * (n // len(base)) + [base.select(range(n % len(base)))])
    full.save_to_disk(str(out))
    return out


def checked_run(path: Path, out: Path) -> Path:
    """The rows saved at ``path`` as a run folder, written as ``generate`` writes its candidates (each image cell
    checked once and recorded): the input ``safetypairs validate`` reads after ``generate``."""
    from datasets import load_from_disk

    from safetypairs.engine.runner import RunConfig, run_stage

    run_stage(load_from_disk(str(path)), lambda rows, device: (rows, {}), stage="candidates", settings={},
              run=RunConfig(out=out, chunk_size=256), device="cpu")
    return out


def bare_loop(data, lpips_spec: str | None, clip_spec: str, batch_size: int) -> int:
    """The same metric calls as `ValidateTransform`, in a plain loop that keeps only the numbers."""

    from safetypairs.validate import change
    from safetypairs import schema as S
    from safetypairs.images import load_image
    from safetypairs.backends.registry import load_backend
    from safetypairs.engine.stage import undecoded
    from safetypairs.validate.thresholds import thresholds_for
    from safetypairs.validate.stage import ValidateConfig

    config = ValidateConfig()
    params = config.mask_params(thresholds_for(config, None)[1])  # the pixel-exact preset's mask settings
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


def overhead(path: Path, run: Path, clip_spec: str, work: Path, rounds: int, batch_size: int,
             chunk_size: int) -> None:
    """Bare loop vs `run_validate` vs `validate_run` on the run folder's rows (and on the saved rows), interleaved
    rounds (warm models)."""
    from datasets import load_from_disk

    from safetypairs.engine.datafiles import read_rows
    from safetypairs.engine.runner import RunConfig
    from safetypairs.validate.stage import ValidateConfig, run_validate, validate_run

    data, saved = read_rows(run), load_from_disk(str(path))
    config = ValidateConfig(lpips=LPIPS_SPEC, clip=clip_spec, device="cpu", batch_size=batch_size)
    bare_loop(data.select(range(batch_size)), LPIPS_SPEC, clip_spec, batch_size)  # warm-up: models, first calls
    run_validate(data.select(range(batch_size)), config)
    decode, unchecked = DecodeClock(), DecodeClock()

    def runner(r: int) -> None:
        with decode:
            validate_run(data, config, RunConfig(out=work / f"validate-{r}", chunk_size=chunk_size))

    def runner_unchecked(r: int) -> None:
        with unchecked:
            validate_run(saved, config, RunConfig(out=work / f"validate-saved-{r}", chunk_size=chunk_size))

    paths = {
        "bare loop": lambda r: bare_loop(data, LPIPS_SPEC, clip_spec, batch_size),
        "run_validate (map_stage)": lambda r: run_validate(data, config),
        "validate_run (runner)": runner,
        "validate_run (saved input)": runner_unchecked,
    }
    seconds = interleaved(paths, rounds)
    print_overhead(f"validate overhead, {len(data)} pairs at {SIDE} px ({LPIPS_SPEC} + tiny hf-clip), batch {batch_size}, "
                   f"chunk {chunk_size}, {rounds} interleaved rounds ({load_line()}):", seconds, "bare loop", 1.10)
    print_runner_parts("validate_run (runner)", [work / f"validate-{r}" for r in range(rounds)], seconds,
                       decode.seconds, "bare loop", "run_validate (map_stage)")
    print_runner_parts("validate_run (saved input)", [work / f"validate-saved-{r}" for r in range(rounds)], seconds,
                       unchecked.seconds, "bare loop", "run_validate (map_stage)")


def _memory_child(path: str, batch_size: int) -> None:
    """One `validate_pairs` run (SSIM/PSNR + tiny CLIP) in this process; prints its peak RSS as JSON."""
    import datasets
    from datasets import load_from_disk

    from safetypairs.validate.stage import validate_pairs

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


def control_ratio(n: int, batch_size: int, encoders: bool, tmp: Path) -> dict:
    """Seconds per pair of `validate_pairs` on the same fingerprinted pairs measured against the original
    (``reference="original"``) and against their control (one more image decoded and compared); best of 2
    alternating runs each, in this process."""
    from datasets import load_from_disk

    from safetypairs.validate.stage import validate_pairs

    path = write_pairs(n, tmp / f"pairs-control-{n}", control=True)
    kwargs = {"lpips": LPIPS_SPEC, "clip": _tiny_clip_spec(tmp / "clip")} if encoders else {}
    data = load_from_disk(str(path))
    validate_pairs(data.select(range(min(n, 2 * batch_size))), device="cpu", batch_size=batch_size, **kwargs)  # warm
    times: dict[str, list[float]] = {"original": [], "control": []}
    for _ in range(2):
        for reference in times:
            times[reference].append(_timed(lambda: validate_pairs(data, device="cpu", batch_size=batch_size,
                                                                  reference=reference, **kwargs)))
    return {k: min(v) / n for k, v in times.items()}


def vae_seconds(sides: list[int], tmp: Path) -> dict[int, dict[str, float]]:
    """Seconds per image of the VAE round trip (`VAERoundTrip`) of the tiny InstructPix2Pix and FLUX.1 Kontext
    pipelines of tests/tiny_models.py, at each square side (median of 3 after a warm-up). The tiny Kontext VAE
    has no downsampling block, so its mid-block attention runs over every pixel: it is timed up to 256 px."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tiny_flux_kontext, build_tiny_ip2p

    from safetypairs.backends.diffusion import DiffusersEditor
    from safetypairs.backends.registry import from_spec_arguments
    from safetypairs.sources import demo_photo

    out: dict[int, dict[str, float]] = {side: {} for side in sides}
    for name, build in (("ip2p", build_tiny_ip2p), ("flux-kontext", build_tiny_flux_kontext)):
        model, options = from_spec_arguments("editors", f"diffusers:{build(tmp / name)},resolution=0")
        roundtrip = DiffusersEditor.roundtrip_reference(model, "cpu", **options)
        for side in sides if name == "ip2p" else [s for s in sides if s <= 256]:
            image = demo_photo("astronaut").resize((side, side))
            roundtrip([image])
            out[side][name] = float(np.median([_timed(roundtrip, [image]) for _ in range(3)]))
    return out


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _control_and_vae(args: argparse.Namespace, tmp: Path) -> None:
    os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    if args.control:
        print(f"control-relative vs plain, {args.control} pairs at {SIDE} px (JPEG q80 fingerprint on edit and control), "
              f"batch {args.batch_size}, best of 2 alternating runs:")
        for encoders in (False, True):
            per = control_ratio(args.control, args.batch_size, encoders, tmp)
            label = f"{LPIPS_SPEC} + tiny open_clip" if encoders else "pixel metrics only"
            print(f"  {label:40s} plain {1000 * per['original']:7.2f} ms/pair  control {1000 * per['control']:7.2f} "
                  f"ms/pair  ratio {per['control'] / per['original']:.3f} (goal <= 1.15)")
    if args.vae:
        print("VAE round trip per image (tiny pipelines of tests/tiny_models.py, CPU, median of 3):")
        for side, times in vae_seconds(args.vae, tmp).items():
            print(f"  {side:5d} px: " + "  ".join(f"{k} {1000 * v:8.1f} ms" for k, v in times.items()))


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
    parser.add_argument("--control", type=int, default=0, help="pairs for the control-relative vs plain ratio")
    parser.add_argument("--vae", type=int, nargs="*", default=[], help="square sides for the VAE round-trip timing")
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
    print(f"bench_validate ({load_line()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')})")
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        work = Path(tmp)
        _control_and_vae(args, work)
        if args.n == 0:
            return
        paths = {k: write_pairs(k, work / f"pairs-{k}") for k in sorted({n, *args.memory})}
        run = checked_run(paths[n], work / f"candidates-{n}")
        clip_spec = _tiny_clip_spec(work / "clip")
        overhead(paths[n], run, clip_spec, work, args.rounds, args.batch_size, chunk_size)
        if not args.skip_scaling:
            scaling(["validate", str(run), "--lpips", LPIPS_SPEC, "--clip", clip_spec, "--device", "cpu",
                     "--batch-size", str(args.batch_size), "--chunk-size", str(chunk_size)], work, args.rounds, "validate")
        if args.memory:
            memory({k: paths[k] for k in args.memory}, args.batch_size)
    print(f"done ({load_line()})")


if __name__ == "__main__":
    main()
