"""Benchmark generation: framework overhead vs a bare pipeline loop, and 2 processes vs 1.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py [--quick]

1. Overhead: `generate_pairs` (in-process `map_stage`) and `generate_run` (the shared runner, the CLI's
   path: chunks + parquet + merge) with a tiny random InstructPix2Pix editor (``diffusers:<path>``) over
   ``n`` sources, against a bare loop that calls the same pipeline, batch by batch, on the same decoded
   images with the same seeds and resizes back. The three run over ``--rounds`` slices of the source in
   rotating order; the ratio is the median of the per-round ratios (goal <= 1.05x); then where the runner's
   time goes.
2. Scaling: ``safetypairs generate`` as 1 process and under ``torchrun --nproc_per_node 2`` (one thread
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")

from harness import DecodeClock, interleaved, load_line, print_overhead, print_runner_parts, scaling  # noqa: E402

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


def overhead(editor_path: str, source_path: Path, work: Path, rounds: int) -> None:
    """Bare loop vs `generate_pairs` vs `generate_run`, interleaved over ``rounds`` slices of the source
    (the order rotates each round, so load changes on a shared machine hit all three alike), after a warm-up."""
    from datasets import load_from_disk
    from diffusers import DiffusionPipeline

    from safetypairs.generate import (
        GenerateConfig,
        RunConfig,
        generate_pairs,
        generate_run,
    )

    source = load_from_disk(str(source_path))
    options = dict(editor_options=(("steps", str(STEPS)), ("resolution", "0")), device="cpu", batch_size=BATCH)
    spec = f"diffusers:{editor_path}"
    config = GenerateConfig(instructor="column:instruction", editor=spec, **options)
    pipe = DiffusionPipeline.from_pretrained(editor_path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    generate_pairs(source.select(range(BATCH)), instructor="column:instruction", editor=spec, **options)  # warm-up
    bare_loop(pipe, source.select(range(BATCH)))
    parts = [source.shard(num_shards=rounds, index=r, contiguous=True) for r in range(rounds)]

    def pairs(r: int) -> None:
        rows = generate_pairs(parts[r], instructor="column:instruction", editor=spec, **options)
        assert rows.unique("edit_status") == ["ok"], rows.unique("edit_status")

    decode = DecodeClock()

    def runner(r: int) -> None:
        with decode:
            generate_run(parts[r], config, RunConfig(out=work / f"overhead-run-{r}", chunk_size=64))

    paths = {"bare loop": lambda r: bare_loop(pipe, parts[r]), "generate_pairs (map_stage)": pairs,
             "generate_run (runner)": runner}
    seconds = interleaved(paths, rounds)
    print_overhead(f"generate overhead, tiny InstructPix2Pix {SIDE} px, {STEPS} steps, {len(source)} sources in {rounds} "
                   f"slices, batch {BATCH}, chunk 64 ({load_line()}):", seconds, "bare loop", 1.05)
    print_runner_parts("generate_run (runner)", [work / f"overhead-run-{r}" for r in range(rounds)], seconds,
                       decode.seconds, "bare loop", "generate_pairs (map_stage)")


def main() -> None:
    """Run both benchmarks and print their numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="sources (default: 200, quick: 80)")
    parser.add_argument("--chunk-size", type=int, default=None, help="chunk size for the scaling runs (default: 20, "
                                                                     "quick: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--quick", action="store_true", help="80 sources, chunk 10 unless given (a smoke run)")
    parser.add_argument("--skip-scaling", action="store_true", help="only the overhead benchmark")
    parser.add_argument("--skip-overhead", action="store_true", help="only the scaling benchmark")
    args = parser.parse_args()
    args.n = args.n or (80 if args.quick else 200)
    args.chunk_size = args.chunk_size or (10 if args.quick else 20)
    os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from tiny_models import build_tiny_ip2p

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # 1: stable on a shared CPU
    print(f"bench_generate ({load_line()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        work = Path(tmp)
        editor = build_tiny_ip2p(work / "ip2p")
        source = write_source(args.n, work / "source")
        if not args.skip_overhead:
            overhead(editor, source, work, args.rounds)
        if not args.skip_scaling:
            scaling(["generate", "--source", str(source), "--instructor", "column:instruction", "--editor",
                     f"diffusers:{editor}", "--editor-options", f"steps={STEPS},resolution=0", "--device", "cpu",
                     "--batch-size", str(BATCH), "--chunk-size", str(args.chunk_size)], work, args.rounds, "generate")
    print(f"done ({load_line()})")


if __name__ == "__main__":
    main()
