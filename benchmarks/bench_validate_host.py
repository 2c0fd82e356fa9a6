"""Benchmark validation's host CPU per row at 1 MP: the pixel measurements as validation made them before (scikit-image
SSIM, numpy ΔE and boolean-indexed means, morphology over the whole image, the original decoded for every
candidate) vs `ValidateTransform` now (OpenCV box-filter SSIM, morphology in the changed box, each original decoded
once per source), side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_validate_host.py [--side 1024] [--sources 4] [--k 4] [--rounds 3]

Rows: K candidates per source, each source a real skimage photo resized to side x side, each candidate with its own
pasted patch; originals and edits are stored as PNG cells, as a run folder holds them. Both sides measure against
the original with pixel metrics only: the judge, LPIPS, CLIP and the VAE round trip are GPU work (their calls per
source are counted in tests/test_validate.py). Neither side includes what `Dataset.map` does after the transform
(encoding the change-mask PNG, ~8 ms at 1 MP, and writing Arrow). CPU seconds are this process's (one thread), far
less distorted than wall clock by other processes on the machine. Goal: <= 0.15 s per 1 MP row (was ~0.5 s).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")

from harness import interleaved, load_line  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")


def rows(side: int, sources: int, k: int) -> dict[str, list]:
    """A batch of ``sources * k`` candidate rows as undecoded PNG cells (candidates of a source adjacent)."""
    from PIL import Image

    from safetypairs import schema as S
    from safetypairs.sources import demo_photo

    def cell(image: Image.Image) -> dict:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    rng = np.random.default_rng(0)
    batch: dict[str, list] = {S.SOURCE_ID: [], S.IMAGE: [], S.EDITED_IMAGE: []}
    for s in range(sources):
        photo = demo_photo(PHOTOS[s % len(PHOTOS)]).resize((side, side))
        original = cell(photo)
        for _ in range(k):
            edited = np.asarray(photo).copy()
            size = int(rng.integers(side // 10, side // 5))
            y, x = rng.integers(0, side - size, 2)
            edited[y:y + size, x:x + size] = rng.integers(0, 256, 3)
            batch[S.SOURCE_ID].append(f"s{s}")
            batch[S.IMAGE].append(original)
            batch[S.EDITED_IMAGE].append(cell(Image.fromarray(edited)))
    return batch


def before(batch: dict[str, list], config) -> list[tuple]:
    """Validation's pixel measurements of every row as they were made before (one row at a time, every original
    decoded for each of its candidates), keeping the numbers."""
    import reference_metrics as plain
    from PIL import Image

    from safetypairs import schema as S
    from safetypairs.images import load_image
    from safetypairs.validate.change import ChangeMask, to_float
    from safetypairs.validate.thresholds import thresholds_for

    params = config.mask_params(thresholds_for(config, None)[1])
    out = []
    for original_cell, edited_cell in zip(batch[S.IMAGE], batch[S.EDITED_IMAGE]):
        a, b = (to_float(load_image(c, config.max_pixels)) for c in (original_cell, edited_cell))
        changed, region, element = plain.change_mask(a, b, params)
        mask = ChangeMask(plain.delta_e(a, b), changed, region, element)  # ΔE again, as the mask kept it
        outside = ~region
        ys, xs = np.nonzero(changed)
        Image.fromarray(changed.astype(np.uint8) * 255)
        out.append((mask.changed_fraction, mask.spread(config.spread_grid, config.spread_cell_min),
                    [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if ys.size else [],
                    plain.masked_mean(mask.delta_e, changed),
                    plain.masked_mean(plain.ssim_map(a, b), outside), plain.psnr_where(a, b, outside)))
    return out


def after(batch: dict[str, list], config, batch_size: int) -> dict[str, list]:
    """`ValidateTransform` over the rows in batches of ``batch_size`` (a fresh transform: nothing decoded yet)."""
    from safetypairs.validate.stage import ValidateTransform

    transform, n = ValidateTransform(config), len(next(iter(batch.values())))
    out: dict[str, list] = {}
    for start in range(0, n, batch_size):
        part = transform({name: values[start:start + batch_size] for name, values in batch.items()})
        for name, values in part.items():
            out.setdefault(name, []).extend(values)
    return out


def parts(batch: dict[str, list], config) -> dict[str, float]:
    """CPU seconds per row of each step of the new path, one row at a time (each original decoded and converted to
    CIELAB once per source, untimed)."""
    from safetypairs import schema as S
    from safetypairs.images import load_image
    from safetypairs.validate import change
    from safetypairs.validate.thresholds import thresholds_for

    params = config.mask_params(thresholds_for(config, None)[1])
    spent = dict.fromkeys(("decode edit", "change mask", "ssim", "psnr", "mask columns"), 0.0)

    def timed(name: str, fn):
        start = time.process_time()
        value = fn()
        spent[name] += time.process_time() - start
        return value

    originals, labs = {}, {}
    for source, original_cell, edited_cell in zip(batch[S.SOURCE_ID], batch[S.IMAGE], batch[S.EDITED_IMAGE]):
        if source not in originals:  # once per source, as `ValidateTransform` does (not timed: 1/K of a row)
            originals[source] = a = change.to_float(load_image(original_cell, config.max_pixels))
            labs[source] = change.to_lab(a)
        a = originals[source]
        b = timed("decode edit", lambda: change.to_float(load_image(edited_cell, config.max_pixels)))
        mask = timed("change mask", lambda: change.change_mask(a, b, params, labs[source]))
        timed("ssim", lambda: change.masked_mean(change.ssim_map(a, b), ~mask.region))
        timed("psnr", lambda: change.psnr_where(a, b, ~mask.region))
        timed("mask columns", lambda: (change.bbox(mask.changed), change.masked_mean(mask.delta_e, mask.changed),
                                        mask.spread(config.spread_grid, config.spread_cell_min)))
    return {name: seconds / len(batch[S.EDITED_IMAGE]) for name, seconds in spent.items()}


def main() -> None:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=1024, help="square side of every image (default: 1024)")
    parser.add_argument("--sources", type=int, default=4, help="sources (default: 4)")
    parser.add_argument("--k", type=int, default=4, help="candidates per source (default: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import torch

    from safetypairs import schema as S
    from safetypairs.validate.stage import ValidateConfig

    import cv2

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)  # OpenCV's own pool ignores OMP_NUM_THREADS; its idle threads' spinning is CPU time too
    config = ValidateConfig(device="cpu", max_side=args.side)
    batch = rows(args.side, args.sources, args.k)
    n, megapixels = args.sources * args.k, args.side * args.side / 1e6
    old, new = before(batch, config), after(batch, config, args.batch_size)  # warm-up, and the numbers compared
    worst = max(abs(o[4] - s) for o, s in zip(old, new[S.SSIM_OUTSIDE]))
    seconds = interleaved({"before (skimage, per candidate)": lambda r: before(batch, config),
                           "ValidateTransform (now)": lambda r: after(batch, config, args.batch_size)}, args.rounds)
    print(f"validate host CPU per row, {n} rows ({args.sources} sources x K={args.k}) at {args.side} px "
          f"({megapixels:.2f} MP), pixel metrics vs the original, batch {args.batch_size}, {args.rounds} interleaved "
          f"rounds ({load_line()}; {threads} thread(s) for torch and OpenCV):")
    per_mp = {name: statistics.median(s["cpu"]) / n / megapixels for name, s in seconds.items()}
    for name, value in per_mp.items():
        wall = statistics.median(seconds[name]["wall"]) / n
        print(f"  {name:34s} {1000 * value:7.1f} ms CPU per 1 MP row  (wall {1000 * wall:.1f} ms per row)")
    base, now = per_mp.values()
    print(f"  speed-up {base / now:.2f}x; now {now:.3f} s per 1 MP row (goal <= 0.15 s); "
          f"largest ssim_outside difference {worst:.1e}")
    print("where a row's host CPU goes now (one row at a time, per row):")
    print("  " + "  ".join(f"{name} {1000 * s / megapixels:.1f} ms" for name, s in parts(batch, config).items()))


if __name__ == "__main__":
    main()
