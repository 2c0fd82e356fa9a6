"""Peak memory of `write_release` for N vs 10N pairs, each in a fresh process (flat is the goal).

    python benchmarks/bench_release.py [--n 40] [--factor 10] [--size 192]

Validated rows are generated on disk first (one process), then another process loads them with
`load_from_disk` and writes the full release (pairs, images, rejected, card); its peak anonymous RSS
minus its anonymous RSS right before the release is the number compared (peak RSS including memory-mapped
Arrow/parquet pages is printed too: those pages are file-backed and grow with the data read).
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


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


class AnonPeak(threading.Thread):
    """Samples anonymous RSS (heap, not memory-mapped Arrow files the OS can drop) every 5 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = _status_mb("RssAnon"), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status_mb("RssAnon"))
            time.sleep(0.005)


def generate(path: str, n: int, size: int) -> None:
    """Write ``n`` sources x 2 candidates of validated rows (real skimage photo crops) to ``path``."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image, ImageDraw
    from skimage import data as skdata

    from safetypairs import schema as S

    photos = [np.asarray(Image.fromarray(getattr(skdata, name)()).convert("RGB"))
              for name in ("astronaut", "chelsea", "coffee", "rocket")]
    features = S.with_columns(S.with_columns(S.with_columns(S.SOURCE_FEATURES, S.INSTRUCT_FEATURES),
                                             S.EDIT_FEATURES), S.VALIDATION_FEATURES)

    def rows():
        rng = np.random.default_rng(0)
        for s in range(n):
            arr = photos[s % len(photos)]
            y, x = rng.integers(0, arr.shape[0] - size), rng.integers(0, arr.shape[1] - size)
            orig = Image.fromarray(arr[y:y + size, x:x + size].copy())
            ImageDraw.Draw(orig).text((4, 4), f"BAD {s}", fill=(255, 0, 0))
            for c in range(2):
                edited = orig.copy()
                ImageDraw.Draw(edited).rectangle((2, 2, size // 2, 16), fill=(30 * c, 200, 90))
                row = {S.SOURCE_ID: f"s{s}", S.IMAGE: orig, S.EDITED_IMAGE: edited, S.CONTROL_IMAGE: orig.copy(),
                       S.EDIT_MASK: Image.new("L", (size, size)), S.CATEGORY: f"O{1 + s % 9}",
                       S.POLICY: "llavaguard@1", S.EDITOR: "bench", S.SEED: c, S.CANDIDATE: c,
                       S.EDIT_STATUS: "ok", S.SSIM_OUTSIDE: 0.9 + 0.01 * c, S.ACCEPTED: s % 5 != 0}
                yield {name: row.get(name) for name in features}

    Dataset.from_generator(rows, features=features, writer_batch_size=64,
                           cache_dir=os.path.join(path, "gen-cache")).save_to_disk(os.path.join(path, "validated"))


def release(path: str) -> dict:
    """Load the validated rows from disk, write the release; report RSS and time."""
    from datasets import load_from_disk

    from safetypairs.release.publish import write_release
    from safetypairs.release.assemble import ReleaseConfig

    validated = load_from_disk(os.path.join(path, "validated"))
    before, sampler = _status_mb("RssAnon"), AnonPeak()
    sampler.start()
    start = time.perf_counter()
    out = write_release(validated, os.path.join(path, "release"), ReleaseConfig(split_by="source"))
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20
    return {"rows": len(validated), "release_mb": size, "seconds": seconds,
            "peak_rss_incl_mmap_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "anon_rss_before_mb": before, "anon_rss_peak_mb": sampler.peak,
            "anon_peak_minus_before_mb": sampler.peak - before}


def _child(*args: str) -> str:
    env = {**os.environ, "SAFETYPAIRS_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="pairs in the small run (default 40)")
    parser.add_argument("--factor", type=int, default=10, help="the large run has factor x n pairs (default 10)")
    parser.add_argument("--size", type=int, default=192, help="image side in pixels (default 192)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, n = args.child
        if mode == "generate":
            generate(path, int(n), args.size)
        else:
            print(json.dumps(release(path)))
        return
    results = {}
    for n in (args.n, args.n * args.factor):
        with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp:
            _child("--size", str(args.size), "--child", "generate", tmp, str(n))
            results[n] = json.loads(_child("--child", "release", tmp, str(n)))
    small, large = results[args.n], results[args.n * args.factor]
    keys = list(small)
    print(f"{'':32s}{f'N={args.n} sources':>18s}{f'{args.factor}N={args.n * args.factor} sources':>22s}{'ratio':>8s}")
    for key in keys:
        print(f"{key:32s}{small[key]:18.1f}{large[key]:22.1f}{large[key] / max(small[key], 1e-9):8.2f}")


if __name__ == "__main__":
    main()
