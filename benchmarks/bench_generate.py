"""Benchmark generation: framework overhead vs a bare pipeline loop, and 2 processes vs 1.

    python benchmarks/bench_generate.py --n 200

1. Overhead: `generate_pairs` and the chunked, resumable `run_generate` (parquet chunks + merge)
   with a tiny random InstructPix2Pix editor (``diffusers:<path>``) over ``n`` sources, against a
   bare loop that calls the same pipeline, batch by batch, on the same decoded images with the
   same seeds and resizes back; the three alternate over ``--rounds`` slices of the source.
   Ratio = framework time / bare time (goal <= 1.10).
2. Scaling: the same ``safetypairs generate`` command as 1 process and under
   ``torchrun --nproc_per_node 2`` (one thread per process), wall time of each subprocess,
   speedup = 1-process time / 2-process time (goal >= 1.6 on 2 cores).

All timings are measured side by side in one run; on a shared machine they are noisy.
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

ROOT = Path(__file__).resolve().parents[1]
SIDE = 64
STEPS = 2
BATCH = 4


def write_source(n: int, out: Path) -> Path:
    """``n`` sources (64 px crops of skimage photos) with an instruction column, saved to disk."""
    import numpy as np
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from safetypairs import schema as S
    from safetypairs.sources import demo_photo

    rng = np.random.default_rng(0)
    photos = [np.asarray(demo_photo(name)) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    rows = {S.SOURCE_ID: [], S.IMAGE: [], S.CATEGORY: [], S.RATIONALE: [], "instruction": []}
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - SIDE), rng.integers(0, photo.shape[1] - SIDE)
        rows[S.SOURCE_ID].append(f"s{i:05d}")
        rows[S.IMAGE].append(PILImage.fromarray(photo[y:y + SIDE, x:x + SIDE]))
        rows[S.CATEGORY].append("O6")
        rows[S.RATIONALE].append("")
        rows["instruction"].append("Replace the knife with a wooden spoon")
    features = Features({S.SOURCE_ID: Value("string"), S.IMAGE: Image(), S.CATEGORY: Value("string"),
                         S.RATIONALE: Value("string"), "instruction": Value("string")})
    Dataset.from_dict(rows, features=features).save_to_disk(str(out))
    return out


def bare_loop(pipe, source) -> float:
    """The same pipeline on the same decoded images and seeds, no framework: seconds."""
    import torch
    from PIL import Image

    from safetypairs import schema as S
    from safetypairs.edit import candidate_seed

    t0 = time.perf_counter()
    images = [img.convert("RGB") for img in source[S.IMAGE]]
    seeds = [candidate_seed(0, sid, 0) for sid in source[S.SOURCE_ID]]
    for start in range(0, len(images), BATCH):
        batch = images[start:start + BATCH]
        with torch.inference_mode():
            out = pipe(prompt=["Replace the knife with a wooden spoon"] * len(batch), image=batch,
                       num_inference_steps=STEPS, output_type="pil",
                       generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + BATCH]]).images
        [img.resize(src.size, Image.Resampling.LANCZOS) for img, src in zip(out, batch)]
    return time.perf_counter() - t0


def overhead(editor_path: str, source_path: Path, work: Path, rounds: int) -> dict[str, float]:
    """Bare loop vs `generate_pairs` vs `run_generate`, interleaved over ``rounds`` slices of the
    source (so load changes on a shared machine hit all three alike), after a warm-up."""
    from datasets import load_from_disk
    from diffusers import DiffusionPipeline

    from safetypairs.generate import (
        GenerateConfig,
        RunConfig,
        generate_pairs,
        run_generate,
    )

    source = load_from_disk(str(source_path))
    options = dict(editor_options=(("steps", str(STEPS)), ("resolution", "0")), device="cpu", batch_size=BATCH)
    spec = f"diffusers:{editor_path}"
    config = GenerateConfig(instructor="column:instruction", editor=spec, **options)
    pipe = DiffusionPipeline.from_pretrained(editor_path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    generate_pairs(source.select(range(BATCH)), instructor="column:instruction", editor=spec, **options)  # warm-up
    bare_loop(pipe, source.select(range(BATCH)))
    totals = {"bare_s": 0.0, "generate_pairs_s": 0.0, "run_generate_s": 0.0}
    ratios: dict[str, list[float]] = {"generate_pairs": [], "run_generate": []}
    for r in range(rounds):
        part = source.shard(num_shards=rounds, index=r, contiguous=True)
        bare = bare_loop(pipe, part)
        t0 = time.perf_counter()
        rows = generate_pairs(part, instructor="column:instruction", editor=spec, **options)
        pairs = time.perf_counter() - t0
        assert rows.unique("edit_status") == ["ok"], rows.unique("edit_status")
        t0 = time.perf_counter()
        run_generate(part, config, RunConfig(out=work / f"overhead-run-{r}", chunk_size=64))
        runner = time.perf_counter() - t0
        for key, value in zip(totals, (bare, pairs, runner)):
            totals[key] += value
        ratios["generate_pairs"].append(pairs / bare)
        ratios["run_generate"].append(runner / bare)
    return {**totals, "ratio_generate_pairs": totals["generate_pairs_s"] / totals["bare_s"],
            "ratio_run_generate": totals["run_generate_s"] / totals["bare_s"],
            "ratio_generate_pairs_per_round": ratios["generate_pairs"],
            "ratio_run_generate_per_round": ratios["run_generate"]}


def _critical_path(meta: dict) -> float:
    """Chunk compute seconds of the busiest rank (the run's compute time without start-up and merge)."""
    from safetypairs.generate import chunk_ranges

    seconds = {int(k): sum(v.values()) for k, v in meta["timings"]["chunk_seconds"].items()}
    world = meta["num_processes"]
    return max(sum(seconds[c] for c, _, _ in chunk_ranges(meta["source_rows"], meta["chunk_size"], rank, world))
               for rank in range(world))


def scaling(editor_path: str, source_path: Path, work: Path, chunk_size: int, two_threads: bool) -> dict[str, float]:
    """Wall time of the CLI as 1 process and as 2 torchrun processes (1 thread each; optionally also
    1 process with 2 threads), and each run's compute critical path."""
    args = ["-m", "safetypairs", "-q", "generate", "--source", str(source_path), "--instructor",
            "column:instruction", "--editor", f"diffusers:{editor_path}", "--editor-options",
            f"steps={STEPS},resolution=0", "--device", "cpu", "--batch-size", str(BATCH),
            "--chunk-size", str(chunk_size)]
    runs = {
        "one_process_1_thread_s": ([], "1"),
        "two_processes_1_thread_s": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "1"),
    }
    if two_threads:
        runs["one_process_2_threads_s"] = ([], "2")
    result = {}
    for name, (launcher, threads) in runs.items():
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT / "src"), SAFETYPAIRS_NO_PROGRESS="1")
        out = work / name
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *launcher, *args, "--out", str(out)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        result[name] = time.perf_counter() - t0
        meta = json.loads((out / "run.json").read_text())
        result[name.replace("_s", "_compute_critical_path_s")] = _critical_path(meta)
    two = "two_processes_1_thread"
    result["speedup_wall"] = result["one_process_1_thread_s"] / result[f"{two}_s"]
    result["speedup_compute"] = (result["one_process_1_thread_compute_critical_path_s"]
                                 / result[f"{two}_compute_critical_path_s"])
    if two_threads:
        result["speedup_wall_vs_1_process_2_threads"] = result["one_process_2_threads_s"] / result[f"{two}_s"]
    return result


def main() -> None:
    """Run both benchmarks and print one JSON object with the timings and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="sources (default: 200)")
    parser.add_argument("--chunk-size", type=int, default=20, help="chunk size for the scaling runs (default: 20)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved overhead rounds (default: 4)")
    parser.add_argument("--skip-scaling", action="store_true", help="only the overhead benchmark")
    parser.add_argument("--skip-overhead", action="store_true", help="only the scaling benchmark")
    parser.add_argument("--two-threads", action="store_true", help="also time 1 process with 2 torch threads")
    args = parser.parse_args()
    os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tiny_ip2p

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        work = Path(tmp)
        editor = build_tiny_ip2p(work / "ip2p")
        source = write_source(args.n, work / "source")
        report = {"n_sources": args.n, "image_side": SIDE, "steps": STEPS, "batch_size": BATCH,
                  "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # 1: stable on a shared CPU
        if not args.skip_overhead:
            report["overhead"] = overhead(editor, source, work, args.rounds)
        if not args.skip_scaling:
            report["scaling"] = scaling(editor, source, work, args.chunk_size, args.two_threads)
        report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
