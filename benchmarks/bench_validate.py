"""Benchmark pair validation: `validate_pairs` vs a bare loop over the same metric calls, peak memory, the
control-relative path vs the plain one, and the VAE round trip of a tiny diffusers pipeline.

    python benchmarks/bench_validate.py --n 1000 --memory 1000 10000
    python benchmarks/bench_validate.py --n 0 --memory --control 300 --vae 256 512

Pairs are 256 px crops of real skimage photos with a pasted patch, written to an Arrow dataset on
disk first (``save_to_disk``) so the run streams them from disk. Encoders are the offline stand-ins
(LPIPS AlexNet with a random backbone, a tiny random open_clip model). The speed comparison runs
both paths in one process with warm models; each memory point runs in a fresh subprocess that
reports its own peak RSS (without LPIPS, whose CPU cost would make 10,000 pairs take ~30 min on 2 cores).
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

SIDE = 256
LPIPS_SPEC = "lpips:alex,pnet_rand=true"


def _tiny_clip_spec(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import register_tiny_open_clip

    return f"open_clip:{register_tiny_open_clip(folder)}/none"


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

    from safetypairs.calibrate import jpeg

    features = Features({S.IMAGE: Image(), S.EDITED_IMAGE: Image(), **({S.CONTROL_IMAGE: Image()} if control else {})})
    base = Dataset.from_generator(rows, gen_kwargs={"count": min(n, 1000)}, features=features,
                                  cache_dir=str(out.parent / "gen-cache"))
    full = concatenate_datasets([base] * (n // len(base)) + [base.select(range(n % len(base)))])
    full.save_to_disk(str(out))
    return out


def bare_loop(path: Path, lpips_spec: str | None, clip_spec: str, batch_size: int) -> int:
    """The same metric calls as `ValidateTransform`, in a plain loop that keeps only the numbers."""
    from datasets import load_from_disk

    from safetypairs import change
    from safetypairs import schema as S
    from safetypairs.images import load_image
    from safetypairs.registry import load_backend
    from safetypairs.stage import undecoded
    from safetypairs.validate import ValidateConfig, thresholds_for

    params = ValidateConfig().mask_params(thresholds_for(ValidateConfig(), None)[1])
    lpips_enc = load_backend("encoders", lpips_spec, "cpu") if lpips_spec else None
    clip_enc = load_backend("encoders", clip_spec, "cpu")
    results = []
    for batch in undecoded(load_from_disk(str(path))).iter(batch_size=batch_size):
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


def run_map(path: Path, lpips_spec: str | None, clip_spec: str, batch_size: int) -> int:
    """`validate_pairs` on the saved dataset (output written to the datasets cache next to it)."""
    from datasets import load_from_disk

    from safetypairs.validate import validate_pairs

    out = validate_pairs(load_from_disk(str(path)), lpips=lpips_spec, clip=clip_spec, device="cpu",
                         batch_size=batch_size)
    return sum(out["accepted"])


def control_ratio(n: int, batch_size: int, encoders: bool, tmp: Path) -> dict:
    """Seconds per pair of `validate_pairs` on the same fingerprinted pairs measured against the original
    (``reference="original"``) and against their control (one more image decoded and compared); best of 2
    alternating runs each, in this process."""
    from datasets import load_from_disk

    from safetypairs.validate import validate_pairs

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
    from safetypairs.sources import demo_photo

    out: dict[int, dict[str, float]] = {side: {} for side in sides}
    for name, build in (("ip2p", build_tiny_ip2p), ("flux-kontext", build_tiny_flux_kontext)):
        roundtrip = DiffusersEditor.roundtrip_reference(f"{build(tmp / name)},resolution=0", "cpu")
        for side in sides if name == "ip2p" else [s for s in sides if s <= 256]:
            image = demo_photo("astronaut").resize((side, side))
            roundtrip([image])
            out[side][name] = float(np.median([_timed(roundtrip, [image]) for _ in range(3)]))
    return out


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _child(mode: str, path: str, batch_size: int) -> None:
    """``speed``: warm models, then loop and map on the same data in this process (twice, best of
    each); ``memory``: one `validate_pairs` run (SSIM/PSNR + tiny CLIP) and this process's peak RSS."""
    os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()  # a repeated map must recompute, not load the previous result
    clip_spec = _tiny_clip_spec(Path(path).parent / "clip")
    if mode == "speed":
        warm = Path(path).parent / "pairs-warm"
        if not warm.exists():
            write_pairs(2 * batch_size, warm)
        bare_loop(warm, LPIPS_SPEC, clip_spec, batch_size)
        run_map(warm, LPIPS_SPEC, clip_spec, batch_size)
        loops, maps = [], []
        for _ in range(2):
            loops.append(_timed(bare_loop, Path(path), LPIPS_SPEC, clip_spec, batch_size))
            maps.append(_timed(run_map, Path(path), LPIPS_SPEC, clip_spec, batch_size))
        print(json.dumps({"loop": loops, "map": maps}))
        return
    peak_anon = [0.0]
    done = threading.Event()

    def sample() -> None:  # anonymous memory only: memory-mapped Arrow pages are file-backed, reclaimable
        while not done.wait(0.1):
            peak_anon[0] = max(peak_anon[0], _rss_anon_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = _timed(run_map, Path(path), None, clip_spec, batch_size)
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


def _spawn(mode: str, path: Path, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(path), "--batch-size", str(batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="pairs for the speed comparison (default: 1000)")
    parser.add_argument("--memory", type=int, nargs="*", default=[1000, 10000], help="pair counts for peak RSS")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--control", type=int, default=0, help="pairs for the control-relative vs plain ratio")
    parser.add_argument("--vae", type=int, nargs="*", default=[], help="square sides for the VAE round-trip timing")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.batch_size)
        return
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        _control_and_vae(args, Path(tmp))
        if not args.n:
            return
        paths = {n: write_pairs(n, Path(tmp) / f"pairs-{n}") for n in sorted({args.n, *args.memory})}
        speed = _spawn("speed", paths[args.n], args.batch_size)
        loop, mapped = min(speed["loop"]), min(speed["map"])
        print(f"speed, {args.n} pairs at {SIDE} px ({LPIPS_SPEC} + tiny open_clip, batch {args.batch_size}, "
              f"OMP_NUM_THREADS={threads}; warm models, best of 2 alternating runs in one process):")
        print(f"  bare loop      {loop:7.1f} s  {args.n / loop:6.1f} pairs/s   runs {speed['loop']}")
        print(f"  validate_pairs {mapped:7.1f} s  {args.n / mapped:6.1f} pairs/s   runs {speed['map']}")
        print(f"  overhead ratio validate_pairs / bare loop = {mapped / loop:.3f} (goal <= 1.15)")
        print("peak RSS of validate_pairs, SSIM/PSNR + tiny open_clip (fresh process each, data from disk):")
        for n in args.memory:
            run = _spawn("memory", paths[n], args.batch_size)
            print(f"  {n:6d} pairs: peak RSS {run['peak_rss_mb']:7.1f} MB (incl. mmapped Arrow pages), "
                  f"peak anonymous {run['peak_anon_mb']:7.1f} MB  ({run['seconds']:.1f} s, {n / run['seconds']:.1f} pairs/s)")


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


if __name__ == "__main__":
    main()
