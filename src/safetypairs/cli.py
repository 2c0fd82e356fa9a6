"""Command line: a thin layer over the ``run_<stage>()`` functions (``safetypairs --help``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger("safetypairs")


class CLIError(Exception):
    """A user error the CLI reports as one line and exit status 2 (no traceback)."""


def _cmd_policies(args: argparse.Namespace) -> int:
    from safetypairs.policy import builtin_policies, load_policy

    names = [args.policy] if args.policy else builtin_policies()
    for name in names:
        policy = load_policy(name)
        sys.stdout.write(f"{policy.id}: {policy.description}\n")
        for cat in policy.categories.values():
            lex = f" (lexicon: {len(cat.lexicon)} words)" if cat.lexicon else ""
            sys.stdout.write(f"  {cat.code}  {cat.name}{lex}\n")
    return 0


def _add_policies(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="list the built-in policies and their categories",
                       description="List built-in safety policies (or one policy file) with their categories.")
    p.add_argument("policy", nargs="?", help="a built-in policy name or a .yaml path (default: all built-in)")
    p.set_defaults(func=_cmd_policies)


def _cmd_demo(args: argparse.Namespace) -> int:
    from safetypairs.demo import DemoConfig, run_demo

    config = DemoConfig(out=args.out, n=args.n, overwrite=args.overwrite, seed=args.seed)
    summary = run_demo(config)
    sys.stdout.write(summary.render() + "\n")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build a real benchmark offline from bundled photos (O1 harassment text overlays)",
        description=(
            "Run the whole SafetyPairs pipeline offline with real pretrained models that ship in wheels: "
            "skimage photos with harassing captions -> template instructions -> rapidocr + OpenCV "
            "inpainting edits (with artifact controls) -> validation (change mask, SSIM/PSNR outside it, "
            "OCR judge) -> a hub-layout dataset -> guard evaluation (ocr-lexicon, nudenet) -> report.html."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (dataset/, report.html, results.json)")
    p.add_argument("--n", type=int, default=24, help="number of source images (default: 24)")
    p.add_argument("--seed", type=int, default=0, help="seed for captions, fonts and placement (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_demo)


def _cmd_release(args: argparse.Namespace) -> int:
    from safetypairs.hub import PushConfig, layout_files, push_release
    from safetypairs.publish import read_input, write_release
    from safetypairs.release import ReleaseConfig

    config = ReleaseConfig(split_by=args.split_by, test_size=args.test_size, seed=args.seed,
                           include_rejected=not args.no_rejected, max_shard_size=args.max_shard_size,
                           license=args.license, pretty_name=args.name)
    push = PushConfig(args.push, private=not args.public, gated=args.gated) if args.push else None
    data = read_input(args.input)
    out = write_release(data, args.out, config, overwrite=args.overwrite)
    files = layout_files(out)
    sys.stdout.write(f"release written to {out} ({len(files)} files)\n")
    for rel, path in files.items():
        sys.stdout.write(f"  {rel}  {path.stat().st_size:,} bytes\n")
    if push and args.dry_run:
        sys.stdout.write(f"dry run: these files would be committed to datasets/{push.repo_id} "
                         f"({'private' if push.private else 'public'}{', gated' if push.gated else ''})\n")
    elif push:
        sys.stdout.write(f"pushed: {push_release(out, push)}\n")
    return 0


def _add_release(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "release", help="assemble validated pairs into a hub-layout dataset (card + parquet) and optionally push it",
        description=(
            "Keep the best accepted candidate per source, give each pair a stable content id, and write the "
            "Hugging Face hub layout (README.md card with YAML configs, data/<config>/<split>-*.parquet with "
            "image bytes embedded, assets/example_grid.jpg): configs pairs (default), images, rejected. "
            "`datasets.load_dataset(OUT)` loads it. --push uploads the same files (private unless --public)."
        ),
    )
    p.add_argument("input", help="validated rows (a save_to_disk folder or parquet/hub layout) or a raw layout "
                                 "with metadata.jsonl")
    p.add_argument("--out", required=True, help="output folder for the hub layout")
    p.add_argument("--split-by", choices=["source"], default=None,
                   help="make a train/test split grouped by source, stratified by category (default: test only)")
    p.add_argument("--test-size", type=float, default=0.5, help="share of sources in test with --split-by (0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    p.add_argument("--no-rejected", action="store_true", help="leave out the rejected config")
    p.add_argument("--max-shard-size", default="500MB", help="largest parquet shard (default: 500MB)")
    p.add_argument("--license", default="cc-by-nc-4.0", help="Hub license id for the card (default: cc-by-nc-4.0)")
    p.add_argument("--name", default="SafetyPairs", help="the card's title")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--push", metavar="ORG/NAME", help="upload to this Hub dataset repo (token: hf auth login / HF_TOKEN)")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", action="store_true", default=True, help="create the repo private (default)")
    vis.add_argument("--public", action="store_true", help="create the repo public")
    p.add_argument("--gated", nargs="?", const="auto", choices=["auto", "manual"], default=None,
                   help="gate access behind the card's research-use agreement (auto approval unless 'manual')")
    p.add_argument("--dry-run", action="store_true", help="write the exact hub layout locally and list it; no upload")
    p.set_defaults(func=_cmd_release)


def _cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from safetypairs.runner import read_rows
    from safetypairs.utils import prepare_out_dir, status_histogram
    from safetypairs.validate import ValidateConfig, run_validate

    if Path(args.out).resolve() == Path(args.input).resolve():
        raise CLIError("--out must differ from the input folder")
    config = ValidateConfig(original_column=args.original_column, edited_column=args.edited_column,
                            policy=args.policy, judge=args.judge, lpips=args.lpips, clip=args.clip,
                            device=args.device, size_mismatch=args.size_mismatch, batch_size=args.batch_size,
                            thresholds=args.thresholds, composite=args.composite)
    rows = read_rows(args.input)  # bad input or settings fail before the output folder is touched
    out = prepare_out_dir(args.out, args.overwrite)
    validated, result = run_validate(rows, config)
    validated.save_to_disk(str(out))
    decisions = status_histogram(reason or "accepted" for reason in validated["reject_reason"])
    sys.stdout.write(f"validate: {result.rows_in} rows; statuses {result.statuses}; decisions {decisions}; "
                     f"saved to {out}\n")
    return 0


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check that edits are local, real and flip the label (adds validation columns)",
        description=(
            "Read candidates (image, edited_image) or pairs from a `safetypairs generate` run folder, a save_to_disk "
            "folder or a parquet folder, compute the change mask, "
            "SSIM/PSNR (and optionally LPIPS/CLIP) outside it and the judge's labels, decide accepted / "
            "reject_reason, and save the result with save_to_disk."
        ),
    )
    p.add_argument("input", help="a generate run folder, a datasets.save_to_disk folder or a parquet folder")
    p.add_argument("--out", required=True, help="output folder (save_to_disk)")
    p.add_argument("--original-column", default="image", help="the unsafe original (default: image)")
    p.add_argument("--edited-column", default="edited_image", help="the edit (default: edited_image)")
    p.add_argument("--policy", default="llavaguard", help="policy name or YAML path (default: llavaguard)")
    p.add_argument("--judge", help="judge spec, e.g. ocr-lexicon (default: no label-flip check)")
    p.add_argument("--lpips", help="LPIPS encoder spec, e.g. lpips:alex (weights download on first use)")
    p.add_argument("--clip", help="CLIP encoder spec, e.g. open_clip:ViT-B-32/openai or hf-clip:<id or path>")
    p.add_argument("--device", default="auto", help="torch device (default: auto = GPU of the rank if any)")
    p.add_argument("--size-mismatch", choices=["reject", "resize"], default="reject",
                   help="what to do when the two images differ in size (default: reject)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per map batch (default: 8)")
    p.add_argument("--thresholds", default=None,
                   help="pixel-exact | latent-diffusion | a YAML file from `safetypairs calibrate` "
                        "(default: the preset of each row's editor)")
    p.add_argument("--composite", action="store_true",
                   help="release original outside the feathered change mask + edit inside (control likewise); "
                        "decisions are made before compositing")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_validate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from safetypairs.calibrate import CalibrateConfig, run_calibrate
    from safetypairs.registry import parse_options

    config = CalibrateConfig(editor=args.editor, editor_options=tuple(parse_options(args.editor_options).items()),
                             base=args.base, seed=args.seed, device=args.device, batch_size=args.batch_size,
                             lpips=args.lpips, clip=args.clip)
    result = run_calibrate(args.source, args.out, config, n=args.n, split=args.split)
    values = ", ".join(f"{k}={v:.4g}" for k, v in result.thresholds.as_dict().items() if v is not None)
    correct = sum(r["ok"] for r in result.rows)
    sys.stdout.write(f"calibrate: {correct}/{len(result.rows)} cases decided as expected; wrote {args.out}: {values}\n")
    if result.unseparated:
        sys.stdout.write(f"  not separable with these metrics: {', '.join(result.unseparated)}\n")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="fit validation thresholds for an editor on your images (writes thresholds.yaml)",
        description=(
            "Pass each source image and known local edits (pasted object, inpainted region, replaced text, "
            "removed thin object) and global changes (brightness, contrast, saturation, blur, JPEG, shift, crop, "
            "hue) of it through the editor with a no-op instruction, measure them against the no-op control "
            "and write thresholds that accept the local edits and reject the global ones "
            "(`safetypairs validate --thresholds FILE`)."
        ),
    )
    p.add_argument("--editor", required=True, help="editor spec, e.g. diffusers:<model id or path>")
    p.add_argument("--editor-options", default="", help="k=v,k=v for the editor (as for generate)")
    p.add_argument("--source", required=True, help="hub dataset id, dataset folder, image folder, or demo[:n]")
    p.add_argument("--split", default="train", help="source split (default: train)")
    p.add_argument("--n", type=int, default=8, help="source images to use (default: 8)")
    p.add_argument("--out", required=True, help="thresholds YAML file to write")
    p.add_argument("--base", default=None, help="preset to start from (default: by editor)")
    p.add_argument("--seed", type=int, default=0, help="seed of every editor call (default: 0)")
    p.add_argument("--device", default="auto", help="auto (GPU when present) or a torch device")
    p.add_argument("--batch-size", type=int, default=4, help="images per editor call (default: 4)")
    p.add_argument("--lpips", help="also fit an LPIPS-outside threshold with this encoder (e.g. lpips:alex)")
    p.add_argument("--clip", help="also fit a CLIP-outside threshold with this encoder")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from safetypairs.evaluate import EvaluateConfig, evaluate_release

    config = EvaluateConfig(guards=tuple(args.guard), policy=args.policy, device=args.device,
                            batch_size=args.batch_size, num_proc=args.num_proc, n_bootstrap=args.bootstrap,
                            seed=args.seed)
    results = evaluate_release(args.dataset, config, args.out, split=args.split)
    if not results:  # a non-zero rank under accelerate launch / torchrun: rank 0 reports
        return 0
    for row in results["leaderboard"]:
        cells = "  ".join(f"{k}={'-' if row[k] is None else round(row[k], 3)}" for k in ("pair_accuracy", "f1", "auroc"))
        sys.stdout.write(f"{row['guard']}: {cells}  unknown={row['n_unknown']}\n")
    sys.stdout.write(f"wrote {args.out}/results.json, predictions.parquet, report.html\n")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate guard models on a released benchmark (metrics, results.json, report.html)",
        description="Run guards over the images config of a release (folder or ORG/NAME) and score them: "
                    "per-image, per-pair and per-category metrics with bootstrap CIs, and a report.",
    )
    p.add_argument("--dataset", required=True, help="release folder or hub repo id")
    p.add_argument("--guard", action="append", required=True,
                   help="guard spec, repeatable (hf-vlm:<id>, llavaguard:<id>, clip-zeroshot:<encoder>, ocr-lexicon, nudenet, ...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--policy", default="llavaguard", help="policy name or YAML path (default: llavaguard)")
    p.add_argument("--split", default=None, help="split (default: test, else train)")
    p.add_argument("--device", default="auto", help="auto (GPU per rank when present) or a torch device")
    p.add_argument("--batch-size", type=int, default=8, help="images per guard call (default: 8)")
    p.add_argument("--num-proc", type=int, default=None, help="map processes, one per GPU (default: 1)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over pairs (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from safetypairs.generate import GenerateConfig, RunConfig, generate_from_source
    from safetypairs.registry import parse_options

    trust = (("trust_remote_code", "true"),) if args.trust_remote_code else ()
    config = GenerateConfig(
        policy=args.policy, instructor=args.instructor, editor=args.editor, candidates=args.candidates,
        control=args.control, seed=args.seed, device=args.device, batch_size=args.batch_size,
        instructor_options=tuple(parse_options(args.instructor_options).items()) + trust,
        editor_options=tuple(parse_options(args.editor_options).items()) + trust, mask_column=args.mask_column,
    )
    summary = generate_from_source(args.source, config, RunConfig(out=args.out, chunk_size=args.chunk_size),
                                   split=args.split)
    if summary is not None:  # rank 0 under accelerate launch / torchrun
        sys.stdout.write(summary.render() + "\n")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="write edit instructions and K candidate edits per source (sharded, resumable)",
        description=(
            "Instruct (policy-aware edit instruction) and edit (K candidates with recorded seeds, optional "
            "artifact control) every source row. Under `accelerate launch` / `torchrun` each rank takes a "
            "contiguous shard; chunks are written as they finish (OUT/chunks) so a killed run resumes where it "
            "stopped; rank 0 merges them into OUT/data/*.parquet and writes OUT/run.json."
        ),
    )
    p.add_argument("--source", required=True,
                   help="hub dataset id, dataset folder, image folder with metadata, or demo[:n]")
    p.add_argument("--split", default="train", help="source split (default: train)")
    p.add_argument("--out", required=True, help="run folder (chunks/, data/, run.json); reused to resume")
    p.add_argument("--policy", default="llavaguard", help="policy name or YAML path (default: llavaguard)")
    p.add_argument("--instructor", default="template",
                   help="template | column:<name> | hf-vlm:<model id or path> (default: template)")
    p.add_argument("--instructor-options", default="", help="k=v,k=v for the instructor (e.g. max_new_tokens=200)")
    p.add_argument("--editor", default="ocr-inpaint",
                   help="ocr-inpaint | diffusers:<model id or path> (default: ocr-inpaint)")
    p.add_argument("--editor-options", default="",
                   help="k=v,k=v for the editor (diffusers: steps, guidance, image_guidance, resolution, dtype, offload)")
    p.add_argument("--mask-column", default=None, help="mask column for inpainting editors (white = edit)")
    p.add_argument("--candidates", type=int, default=1, help="edits per source, each with its own seed (default: 1)")
    p.add_argument("--control", action="store_true", help="also edit the original with a no-op instruction")
    p.add_argument("--seed", type=int, default=0, help="run seed all candidate seeds derive from (default: 0)")
    p.add_argument("--chunk-size", type=int, default=64, help="source rows per resumable chunk (default: 64)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per instructor/editor call (default: 4)")
    p.add_argument("--device", default="auto", help="auto (the rank's GPU when present) or a torch device")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model repos' own code (off by default; only for repos you trust)")
    p.set_defaults(func=_cmd_generate)


# Each entry adds one subcommand; stages register theirs here.
# In pipeline order, as `safetypairs --help` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_generate, _add_calibrate, _add_validate, _add_release, _add_evaluate, _add_policies,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``safetypairs`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="safetypairs",
        description=(
            "SafetyPairs: counterfactual image pairs for image-safety research (arXiv 2510.21120). "
            "Generate targeted edits that flip a policy label, validate that they are local, release the "
            "benchmark as a Hugging Face dataset and evaluate guard models on it."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _configure_output(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("RapidOCR", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if quiet:
        import datasets

        datasets.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safetypairs`` command.

    Returns:
        The exit status: 0 on success, 2 for a user error (reported as one line on stderr).
    """
    args = build_parser().parse_args(argv)
    _configure_output(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError, KeyError) as err:  # OSError: missing/unwritable files and folders
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"safetypairs {args.command}: error: {message}\n")
        return 2
