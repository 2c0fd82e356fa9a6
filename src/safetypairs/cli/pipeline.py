"""Subcommands that build a benchmark: generate, calibrate, validate, release."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from safetypairs.cli.common import (
    CLIError,
    check_out,
    run_config,
    run_sharded,
    spec_options,
    write_summary,
)
from safetypairs.cli.options import (
    add_batch_size,
    add_chunk_size,
    add_device,
    add_max_pixels,
    add_out,
    add_overwrite,
    add_png_level,
    add_policy,
    add_seed,
    add_source_split,
)

# --keep-instructor: the word -> GenerateConfig.keep_instructor (auto: keep it on the CPU, free it on a GPU)
KEEP_INSTRUCTOR = {"auto": None, "on": True, "off": False}


def _cmd_generate(args: argparse.Namespace) -> int:
    from safetypairs.generate import GenerateConfig, generate_from_source

    trust = (("trust_remote_code", "true"),) if args.trust_remote_code else ()
    config = GenerateConfig(
        policy=args.policy, instructor=args.instructor, editor=args.editor, candidates=args.candidates,
        control=args.control, seed=args.seed, device=args.device, batch_size=args.batch_size,
        edit_batch_size=args.edit_batch_size, keep_instructor=KEEP_INSTRUCTOR[args.keep_instructor],
        instructor_options=spec_options(args.instructor_options) + trust,
        editor_options=spec_options(args.editor_options) + trust, mask_column=args.mask_column,
        max_pixels=args.max_pixels, png_level=args.png_level,
    )
    run = run_config(args, args.source)
    return write_summary(generate_from_source(args.source, config, run, split=args.split,
                                              columns=_source_columns(args)))


def _source_columns(args: argparse.Namespace):
    from safetypairs.sources import SourceColumns

    keep = tuple(c.strip() for c in (args.keep_columns or "").split(",") if c.strip())
    return SourceColumns(image=args.image_column, category=args.category_column, rationale=args.rationale_column,
                         id=args.id_column, label=args.label_column, keep=keep, follow_links=args.follow_links)


def _add_source_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-column", default="image", help="the image column (default: image); an image folder's "
                                                           "metadata names its files in file_name, else in this column")
    p.add_argument("--follow-links", action="store_true",
                   help="read an image folder's files that are links to places outside it (refused by default)")
    p.add_argument("--category-column", default="category",
                   help="the policy category: O1, 'O1: Hate, ...', a name or an alias; NA = safe (default: category)")
    p.add_argument("--rationale-column", default="rationale", help="why the image is unsafe (default: rationale)")
    p.add_argument("--id-column", default=None,
                   help="unique row ids (default: an image folder's file path, else source_id, else the row number)")
    p.add_argument("--label-column", default=None,
                   help="safe/unsafe label; safe rows are set aside (default: the first of label, rating, "
                        "safety_label; 'none' reads no label)")
    p.add_argument("--keep-columns", default="", help="comma-separated columns copied into source_meta (provenance "
                                                      "that travels into the release)")


def add_generate(sub: argparse._SubParsersAction) -> None:
    """The ``generate`` subcommand."""
    p = sub.add_parser(
        "generate", help="write edit instructions and K candidate edits per source (sharded, resumable)",
        description=(
            "Instruct (policy-aware edit instruction) and edit (K candidates with recorded seeds, optional "
            "artifact control) every source row. Under `accelerate launch` / `torchrun` the ranks claim "
            "chunks as they go; chunks are written as they finish (OUT/chunks) so a killed run resumes where it "
            "stopped; rank 0 merges them into OUT/data/*.parquet and writes OUT/run.json."
        ),
    )
    p.add_argument("--source", required=True,
                   help="an image folder with metadata.jsonl or metadata.csv (file_name, category, rationale, "
                        "rating...), a save_to_disk folder, .parquet file(s), a hub dataset id ORG/NAME, or demo[:n]")
    add_source_split(p)
    _add_source_columns(p)
    add_out(p, "run folder (chunks/, data/, run.json); reused to resume")
    add_policy(p)
    p.add_argument("--instructor", default="template",
                   help="template | column:<name> | hf-vlm:<model id or path> (default: template)")
    p.add_argument("--instructor-options", default="", help="k=v,k=v for the instructor (e.g. max_new_tokens=200)")
    p.add_argument("--editor", default="ocr-inpaint",
                   help="ocr-inpaint | diffusers:<model id or path> (default: ocr-inpaint)")
    p.add_argument("--editor-options", default="",
                   help="k=v,k=v for the editor (diffusers: steps, guidance, resolution, dtype, offload, max_batch, "
                        "compile, attention_backend, cache, quantize...; `safetypairs backends` lists them)")
    p.add_argument("--mask-column", default=None, help="mask column for inpainting editors (white = edit)")
    p.add_argument("--candidates", type=int, default=1, help="edits per source, each with its own seed (default: 1)")
    p.add_argument("--control", action="store_true", help="also edit the original with a no-op instruction")
    add_seed(p, "run seed all candidate seeds derive from")
    add_chunk_size(p, 64, "source rows")
    add_batch_size(p, 4, "rows per instructor/editor call")
    p.add_argument("--edit-batch-size", type=int, default=None,
                   help="source rows per editor batch, each with its candidates and control (default: --batch-size)")
    p.add_argument("--keep-instructor", choices=KEEP_INSTRUCTOR, default="auto",
                   help="keep the instructor loaded while editing: off frees it, so one model is in the GPU's memory "
                        "at a time (both reload once per chunk); auto (default): off on a GPU, on for the CPU")
    add_device(p)
    add_overwrite(p, run=True)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model repos' own code (off by default; only for repos you trust)")
    add_max_pixels(p)
    add_png_level(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from safetypairs.validate.calibrate import CalibrateConfig, run_calibrate

    config = CalibrateConfig(editor=args.editor, editor_options=spec_options(args.editor_options),
                             base=args.base, seed=args.seed, device=args.device, batch_size=args.batch_size,
                             lpips=args.lpips, clip=args.clip)
    result = run_calibrate(args.source, args.out, config, n=args.n, split=args.split)
    values = ", ".join(f"{k}={v:.4g}" for k, v in result.thresholds.as_dict().items() if v is not None)
    correct = sum(r["ok"] for r in result.rows)
    sys.stdout.write(f"calibrate: {correct}/{len(result.rows)} cases decided as expected; wrote {args.out}: {values}\n")
    if result.unseparated:
        sys.stdout.write(f"  not separable with these metrics: {', '.join(result.unseparated)}\n")
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    """The ``calibrate`` subcommand."""
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
    add_source_split(p)
    p.add_argument("--n", type=int, default=8, help="source images to use (default: 8)")
    add_out(p, "thresholds YAML file to write")
    p.add_argument("--base", default=None, help="preset to start from (default: by editor)")
    add_seed(p, "seed of every editor call")
    add_device(p)
    add_batch_size(p, 4, "images per editor call")
    p.add_argument("--lpips", help="also fit an LPIPS-outside threshold with this encoder (e.g. lpips:alex)")
    p.add_argument("--clip", help="also fit a CLIP-outside threshold with this encoder")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from safetypairs.engine.datafiles import read_rows
    from safetypairs.validate.stage import ValidateConfig, check_measured, validate_run

    config = ValidateConfig(original_column=args.original_column, edited_column=args.edited_column,
                            policy=args.policy, judge=args.judge, lpips=args.lpips, clip=args.clip,
                            device=args.device, size_mismatch=args.size_mismatch, batch_size=args.batch_size,
                            thresholds=args.thresholds, composite=args.composite, max_pixels=args.max_pixels,
                            png_level=args.png_level)
    run = run_config(args, args.input)

    def stage(rows: Any) -> Any:
        summary = validate_run(rows, config, run)
        if summary is not None:
            check_measured(summary)
        return summary

    return run_sharded(config.device, lambda: read_rows(args.input), stage)


def add_validate(sub: argparse._SubParsersAction) -> None:
    """The ``validate`` subcommand."""
    p = sub.add_parser(
        "validate", help="check that edits are local, real and flip the label (adds validation columns)",
        description=(
            "Read candidates (image, edited_image) or released pairs (unsafe_image, safe_image: recognised by their "
            "columns) from a `safetypairs generate` run folder, a save_to_disk folder or a parquet folder, compute "
            "the change mask, "
            "SSIM/PSNR (and optionally LPIPS/CLIP) outside it and the judge's labels, decide accepted / "
            "reject_reason, and write a run folder (OUT/data/*.parquet + OUT/run.json). Under `accelerate "
            "launch` / `torchrun` the ranks claim chunks as they go; a killed run resumes where it stopped."
        ),
    )
    p.add_argument("input", help="a generate run folder, a datasets.save_to_disk folder or a parquet folder")
    add_out(p, "output run folder (data/*.parquet, run.json); reused to resume")
    p.add_argument("--original-column", default="image", help="the unsafe original (default: image)")
    p.add_argument("--edited-column", default="edited_image", help="the edit (default: edited_image)")
    add_policy(p)
    p.add_argument("--judge", help="judge spec, e.g. ocr-lexicon (default: none: a warning, label_flip_checked = "
                                   "false, and the card says no judge checked the flip)")
    p.add_argument("--lpips", help="LPIPS encoder spec, e.g. lpips:alex (weights download on first use)")
    p.add_argument("--clip", help="CLIP encoder spec, e.g. open_clip:ViT-B-32/openai or hf-clip:<id or path>")
    add_device(p)
    p.add_argument("--size-mismatch", choices=["reject", "resize"], default="reject",
                   help="what to do when the two images differ in size (default: reject)")
    add_batch_size(p, 8, "rows per map batch")
    p.add_argument("--thresholds", default=None,
                   help="pixel-exact | latent-diffusion | a YAML file from `safetypairs calibrate` "
                        "(default: the preset of each row's editor)")
    p.add_argument("--composite", action="store_true",
                   help="release original outside the feathered change mask + edit inside (control likewise); "
                        "decisions are made before compositing")
    add_chunk_size(p, 64)
    add_overwrite(p, run=True)
    add_max_pixels(p)
    add_png_level(p)
    p.set_defaults(func=_cmd_validate)


def _cmd_release(args: argparse.Namespace) -> int:
    from safetypairs.release.hub import PushConfig, layout_files, push_release
    from safetypairs.release.publish import read_input, write_release
    from safetypairs.release.assemble import ReleaseConfig

    config = ReleaseConfig(split_by=args.split_by, test_size=args.test_size, seed=args.seed,
                           include_rejected=not args.no_rejected, max_shard_size=args.max_shard_size,
                           license=args.license, pretty_name=args.name, max_pixels=args.max_pixels)
    push = PushConfig(args.push, private=not args.public, gated=args.gated) if args.push else None
    if args.min_reviewers is not None and not args.require_review:
        raise CLIError("--min-reviewers needs --require-review")
    check_out(args.out, (args.input,))
    data = read_input(args.input)
    review = _load_review(args, data) if args.require_review else None
    pushed: list[str] = []
    upload = (lambda work: pushed.append(push_release(work, push))) if push and not args.dry_run else None
    out = write_release(data, args.out, config, overwrite=args.overwrite, review=review,
                        before_rename=upload)  # a failed upload leaves no folder; --out was checked above
    files = layout_files(out)
    sys.stdout.write(f"release written to {out} ({len(files)} files)\n")
    for rel, path in files.items():
        sys.stdout.write(f"  {rel}  {path.stat().st_size:,} bytes\n")
    if push and args.dry_run:
        sys.stdout.write(f"dry run: these files would be committed to datasets/{push.repo_id} "
                         f"({'private' if push.private else 'public'}{', gated' if push.gated else ''})\n")
    elif push:
        sys.stdout.write(f"pushed: {pushed[0]}\n")
    return 0


def _load_review(args: argparse.Namespace, data: Any) -> Any:
    """The reviewers' verdicts (`review.store.ReviewResult`) on validated rows for ``--require-review``."""
    from datasets import Dataset

    from safetypairs.review.store import load_review

    if not isinstance(data, Dataset):
        raise CLIError("--require-review needs validated rows, not a raw layout")
    return load_review(args.input, data, args.min_reviewers or 1)


def add_release(sub: argparse._SubParsersAction) -> None:
    """The ``release`` subcommand."""
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
    add_out(p, "output folder for the hub layout")
    p.add_argument("--split-by", choices=["source"], default=None,
                   help="make a train/test split grouped by source, stratified by category (default: test only)")
    p.add_argument("--test-size", type=float, default=0.5, help="share of sources in test with --split-by (0.5)")
    add_seed(p, "seed of the split")
    p.add_argument("--no-rejected", action="store_true", help="leave out the rejected config")
    p.add_argument("--max-shard-size", default="500MB", help="largest parquet shard (default: 500MB)")
    p.add_argument("--license", default="cc-by-nc-4.0", help="Hub license id for the card (default: cc-by-nc-4.0)")
    p.add_argument("--name", default="SafetyPairs", help="the card's title")
    add_overwrite(p, run=False)
    p.add_argument("--push", metavar="ORG/NAME", help="upload to this Hub dataset repo (token: hf auth login / HF_TOKEN)")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--gated", nargs="?", const="auto", choices=["auto", "manual"], default=None,
                   help="gate access behind the card's research-use agreement (auto approval unless 'manual')")
    p.add_argument("--dry-run", action="store_true", help="write the exact hub layout locally and list it; no upload")
    p.add_argument("--require-review", action="store_true",
                   help="release only pairs a majority of reviewers accepted (INPUT/review.jsonl, `safetypairs review`)")
    p.add_argument("--min-reviewers", type=int, default=None,
                   help="with --require-review: reviewers needed per pair (default: 1)")
    add_max_pixels(p)
    p.set_defaults(func=_cmd_release)
