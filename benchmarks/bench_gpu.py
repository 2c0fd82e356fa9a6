"""GPU benchmark of the editor's speed and memory options, for a lent GPU, in one prepared command.

    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py [--models tiny-ip2p tiny-kontext <path or hub id>...]
        [--n 8] [--resolution 1024] [--steps 28] [--rounds 2] [--variants baseline compile ...] [--instructor SPEC]

A model ladder, smallest first: the tiny random pipelines of tests/tiny_models.py (built here, ``tiny-ip2p``,
``tiny-kontext``), then any local ``save_pretrained`` folder or cached hub id given (the GPU machine has no
network: real weights must already be in its cache). For each model, each variant runs in its own process (so its
peak memory is its own, and compile / attention-backend state does not leak into the next) and reports:

- ``edit``: images/s over ``--rounds`` timed calls of ``--n`` images after one warm-up call (the warm-up's seconds,
  which hold the compilation, are printed apart), peak memory (``torch.cuda.max_memory_allocated`` on a GPU,
  the growth of the resident set on the CPU) and the ratio to the model's baseline, side by side;
- ``generate``: the whole generate path, model loading included (instruct, then edit), with the instructor freed
  before editing and kept (``keep_instructor``): its images/s and peak memory, per model.

Variants are editor options (``name=k=v,k=v``); the defaults compare the baseline with each speed option alone:
``compile``, ``attention`` (``_native_cudnn`` on a GPU, ``_native_math`` on the CPU), ``first_block`` /
``taylorseer`` step caches (which change outputs), ``fp8-storage`` and, where torchao is installed,
``torchao-fp8`` (both change outputs), and ``no-slicing`` (VAE slicing off). A variant whose option cannot run
here (a missing package, a UNet pipeline without step caches) prints its one-line error instead of numbers.
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
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")

from harness import load_line  # noqa: E402

TINY = {"tiny-ip2p": "build_tiny_ip2p", "tiny-kontext": "build_tiny_flux_kontext"}


def default_variants(cuda: bool) -> dict[str, str]:
    """Variant name -> editor options (``k=v,k=v``): the baseline and each speed option alone."""
    import importlib.util

    variants = {"baseline": "", "compile": "compile=true",
                "attention": f"attention_backend={'_native_cudnn' if cuda else '_native_math'}",
                "first_block": "cache=first_block", "taylorseer": "cache=taylorseer",
                "fp8-storage": "quantize=fp8-storage", "no-slicing": "vae_slicing=off"}
    if importlib.util.find_spec("torchao") is not None:
        variants["torchao-fp8"] = "quantize=torchao-fp8"
    return variants


def photos(n: int, side: int) -> list:
    """``n`` skimage photos (4 kinds, cycled) resized to ``side`` x ``side``."""
    from safetypairs.sources import demo_photo

    names = ("astronaut", "coffee", "chelsea", "rocket")
    return [demo_photo(names[i % 4]).convert("RGB").resize((side, side)) for i in range(n)]


def peak_reset(device: str) -> float:
    """Reset the peak counter; the resident set (MB) now, the CPU's baseline."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return _rss_mb()


def peak_mb(device: str, base_rss: float) -> float:
    """Peak GPU memory allocated (MB) since `peak_reset`, or on the CPU the resident set's growth."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mb() - base_rss


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_edit(model: str, options: str, args: argparse.Namespace) -> dict:
    """One variant: load the editor, one warm-up call, ``rounds`` timed calls."""
    from safetypairs.backends.options import parse_options
    from safetypairs.backends.registry import build_backend

    images = photos(args.n, args.side)
    base = peak_reset(args.device)
    t0 = time.perf_counter()
    editor = build_backend("editors", f"diffusers:{model}", args.device, steps=args.steps,
                           resolution=args.resolution, **parse_options(options))
    load = time.perf_counter() - t0
    seeds = list(range(args.n))
    t0 = time.perf_counter()
    editor.edit(images, ["replace the cat with a dog"] * args.n, seeds)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in range(args.rounds):
        editor.edit(images, ["replace the cat with a dog"] * args.n, [s + r + 1 for s in seeds])
    seconds = time.perf_counter() - t0
    return {"load_s": load, "warmup_s": warm, "images_per_s": args.n * args.rounds / seconds,
            "peak_mb": peak_mb(args.device, base)}


def child_generate(model: str, keep: bool, args: argparse.Namespace) -> dict:
    """The generate path (instruct, free or keep the instructor, edit) over ``n`` sources."""
    from datasets import Dataset

    from safetypairs import schema as S
    from safetypairs.generate import generate_pairs

    source = Dataset.from_dict({S.SOURCE_ID: [f"s{i}" for i in range(args.n)], S.IMAGE: photos(args.n, args.side),
                                S.CATEGORY: ["O6"] * args.n, S.RATIONALE: ["a knife"] * args.n,
                                "instruction": ["Replace the knife with a wooden spoon"] * args.n})
    base = peak_reset(args.device)
    t0 = time.perf_counter()
    out = generate_pairs(source, instructor=args.instructor, editor=f"diffusers:{model}", device=args.device,
                         batch_size=args.n, keep_instructor=keep,
                         editor_options=(("steps", str(args.steps)), ("resolution", str(args.resolution))))
    seconds = time.perf_counter() - t0
    ok = sum(s == "ok" for s in out[S.EDIT_STATUS])
    return {"images_per_s": len(out) / seconds, "peak_mb": peak_mb(args.device, base), "ok": ok}


def run_child(argv: list[str]) -> dict:
    """Run one measurement in a fresh process; its JSON answer, or ``{"error": <last line>}``."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(lines[-1])


def ladder(models: list[str], work: Path) -> list[tuple[str, str]]:
    """``(label, model path or id)`` for each rung, the tiny pipelines built into ``work``."""
    import tiny_models

    rungs = []
    for model in models:
        path = getattr(tiny_models, TINY[model])(work / model) if model in TINY else model
        rungs.append((model, path))
    return rungs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TINY), help="tiny-ip2p, tiny-kontext, paths or hub ids")
    parser.add_argument("--n", type=int, default=8, help="images per edit call")
    parser.add_argument("--side", type=int, default=64, help="source image side (px)")
    parser.add_argument("--resolution", type=int, default=32, help="working resolution (1024 for real models)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (28 for FLUX.1 Kontext)")
    parser.add_argument("--rounds", type=int, default=2, help="timed calls after the warm-up")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="name=k=v,k=v variants (default: baseline and each speed option alone)")
    parser.add_argument("--instructor", default="column:instruction", help="instructor spec of the generate part")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        kind, model, value = args.child
        result = child_edit(model, value, args) if kind == "edit" else child_generate(model, value == "keep", args)
        print(json.dumps(result))
        return
    variants = default_variants(args.device.startswith("cuda"))
    if args.variants:
        variants = dict(v.split("=", 1) if "=" in v else (v, variants[v]) for v in args.variants)
    common = ["--n", str(args.n), "--side", str(args.side), "--resolution", str(args.resolution), "--steps",
              str(args.steps), "--rounds", str(args.rounds), "--device", args.device, "--instructor", args.instructor]
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"bench_gpu on {gpu}; {args.n} images of {args.side}px at resolution {args.resolution}, {args.steps} steps, "
          f"{args.rounds} timed rounds; {load_line()}")
    memory = "peak MB (cuda max allocated)" if args.device.startswith("cuda") else "peak MB (RSS growth)"
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in ladder(args.models, Path(tmp)):
            print(f"\n== {label}\n{'stage':9} {'variant':14} {'images/s':>9} {'x baseline':>10} {memory:>28} "
                  f"{'warm-up s':>9} {'load s':>7}")
            base = None
            for name, options in variants.items():
                r = run_child(["--child", "edit", model, options, *common])
                if "error" in r:
                    print(f"{'edit':9} {name:14} error: {r['error']}")
                    continue
                base = r["images_per_s"] if name == "baseline" else base
                ratio = f"{r['images_per_s'] / base:.2f}" if base else "-"
                print(f"{'edit':9} {name:14} {r['images_per_s']:9.2f} {ratio:>10} {r['peak_mb']:28.1f} "
                      f"{r['warmup_s']:9.2f} {r['load_s']:7.2f}")
            for keep in ("free", "keep"):
                r = run_child(["--child", "generate", model, keep, *common])
                if "error" in r:
                    print(f"{'generate':9} {keep + ' instr.':14} error: {r['error']}")
                    continue
                print(f"{'generate':9} {keep + ' instr.':14} {r['images_per_s']:9.2f} {'-':>10} {r['peak_mb']:28.1f}")


if __name__ == "__main__":
    main()
