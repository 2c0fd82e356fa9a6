"""Benchmark: peak RSS of generate and validate on hostile images (a 12000x12000 PNG among them) against the
same rows without the oversized files, and the cost of the writer's image check (every cell decoded once; the
same bytes, recorded as checked, not again).

Run: OMP_NUM_THREADS=2 PYTHONPATH=src:tests python benchmarks/bench_hostile.py [--src OTHER_CHECKOUT/src] [--n 64]
(``--src`` measures another checkout's code on the same files, e.g. the commit before the pixel cap.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("src", "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")
OVERSIZED = ("huge.png", "lying_header.png")


def peak_rss_mb(src: str, *args: str) -> float:
    """Peak RSS (MB) of ``safetypairs ARGS`` run with ``src`` first on the path, measured by a parent of its own."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stderr.write(p.stderr[-2000:] if p.returncode else ''); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "safetypairs", "-q", *args],
                         capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1]) / 1024


def source_folder(root: Path, oversized: bool) -> Path:
    """The hostile files (tests/hostile_files.py) as an image folder with metadata; optionally without the oversized ones."""
    from hostile_files import write_files

    from safetypairs.sources import render_demo_row

    folder = root / ("hostile" if oversized else "no_oversized")
    paths = write_files(folder, render_demo_row(0, 0)["image"])
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for name, path in paths.items():
            if name in OVERSIZED and not oversized:
                path.unlink()
                continue
            meta.write(json.dumps({"file_name": name, "source_id": name, "category": "O1"}) + "\n")
    return folder


def candidates(root: Path, oversized: bool) -> Path:
    """Validate input: every hostile file as an original next to a good edit."""
    from datasets import Dataset, Features, Image, Value
    from hostile_files import encode, hostile_files, photo

    files = {k: v for k, v in hostile_files().items() if oversized or k not in OVERSIZED}
    edit = encode(photo(96))
    features = Features({"source_id": Value("string"), "category": Value("string"), "image": Image(),
                         "edited_image": Image(), "edit_status": Value("string")})
    rows = [{"source_id": k, "category": "O1", "image": {"bytes": v, "path": None},
             "edited_image": {"bytes": edit, "path": None}, "edit_status": "ok"} for k, v in files.items()]
    path = root / f"candidates-{oversized}"
    Dataset.from_list(rows, features=features).save_to_disk(str(path))
    return path


def bench_rss(src: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for what in ("generate", "validate"):
            mb = {}
            for oversized in (False, True):
                if what == "generate":
                    args = ("generate", "--source", str(source_folder(root, oversized)), "--device", "cpu")
                else:
                    args = ("validate", str(candidates(root, oversized)), "--device", "cpu")
                mb[oversized] = peak_rss_mb(src, *args, "--out", str(root / f"{what}-{oversized}"))
            print(f"{what:<9} peak RSS  without the oversized files {mb[False]:7.0f} MB   with them {mb[True]:7.0f} MB"
                  f"   ratio {mb[True] / mb[False]:.2f}")


def bench_write(n: int = 64) -> None:
    """The writer with its image check vs the same parquet written without it, and a second write of the rows it
    wrote (what the next stage writes: the same bytes, recorded as checked, are not decoded again)."""
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Image
    from datasets.table import embed_table_storage

    from safetypairs.engine.datafiles import ROW_GROUP_SIZE, DataFiles, write_parquet
    from safetypairs.sources import DEMO_PHOTOS, demo_photo

    images = [demo_photo(DEMO_PHOTOS[i % len(DEMO_PHOTOS)]).rotate(i) for i in range(n)]
    ds = Dataset.from_dict({c: images for c in ("image", "edited_image", "control_image")},
                           features=Features({c: Image() for c in ("image", "edited_image", "control_image")}))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with pq.ParquetWriter(Path(tmp) / "bare.parquet", schema=ds.features.arrow_schema) as writer:
            for table in ds.with_format("arrow").iter(batch_size=ROW_GROUP_SIZE):
                writer.write_table(embed_table_storage(table), row_group_size=ROW_GROUP_SIZE)
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_parquet(ds, Path(tmp) / "checked.parquet", record=True)
        checked = time.perf_counter() - t0
        rows = DataFiles((Path(tmp) / "checked.parquet",)).rows()
        t0 = time.perf_counter()
        write_parquet(rows, Path(tmp) / "again.parquet", record=True)
        again = time.perf_counter() - t0
    print(f"write {n} rows x 3 images of <=512 px: bare {bare:.2f} s, checked {checked:.2f} s, ratio {checked / bare:.2f}"
          f" ({(checked - bare) / (3 * n) * 1000:.1f} ms per image cell); the same bytes again (recorded): "
          f"{again:.2f} s, ratio {again / bare:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"),
                        help="the source folder whose code runs the CLI (default: this checkout's)")
    parser.add_argument("--n", type=int, default=64, help="rows of the writer benchmark (default: 64)")
    args = parser.parse_args()
    bench_rss(args.src)
    bench_write(args.n)
