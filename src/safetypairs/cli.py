"""Command line: a thin layer over the ``run_<stage>()`` functions (``safetypairs --help``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("safetypairs")


class CLIError(Exception):
    """A user error the CLI reports as one line and exit status 2 (no traceback)."""


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    from safetypairs.images import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image decoded, in pixels (default: {DEFAULT_MAX_PIXELS:,}); larger JPEGs are decoded "
                        "reduced, other larger images get status too_large and a null cell")


def _cmd_policies(args: argparse.Namespace) -> int:
    from safetypairs.policy import builtin_policies, load_policy

    names = [args.policy] if args.policy else builtin_policies()
    if args.render:
        from safetypairs.backends.vlm_guards import render_guard_prompt

        if not args.policy:
            raise CLIError("--render needs a policy name or file")
        policy = load_policy(args.policy)
        if args.category is not None and args.category not in policy.categories:
            raise CLIError(f"unknown category {args.category!r}; allowed: {', '.join(policy.categories)}")
        scope = "category" if args.category else "all"
        sys.stdout.write(render_guard_prompt(args.render, policy, args.category, scope).rstrip("\n") + "\n")
        return 0
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
    p.add_argument("--render", choices=("llavaguard", "shieldgemma2", "hf-vlm"),
                   help="print the exact policy prompt this guard gets, in its trained format")
    p.add_argument("--category", help="with --render: the row's category (scope=category; LlavaGuard marks "
                                      "the others as not violated in this context)")
    p.set_defaults(func=_cmd_policies)


def _backend_lines(kind: str, alias: str) -> list[str]:
    """One backend: alias, origin and target, its summary and capabilities, then its options."""
    from safetypairs import registry
    from safetypairs.backends.base import missing_members

    head = f"  {alias}  ({registry.origin(kind, alias)}: {registry.REGISTRY[kind][alias]})"
    try:
        cls = registry.backend_class(kind, alias)
    except (ImportError, AttributeError) as err:
        return [f"{head}  cannot be imported: {type(err).__name__}: {err}"]
    summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    notes = [f"does not implement {', '.join(gaps)}"] if (gaps := missing_members(kind, cls)) else []
    if kind == "editors":
        notes.append("takes masks" if getattr(cls, "takes_mask", False) else "takes no mask")
    lines = [head + (f"  [{'; '.join(notes)}]" if notes else ""), f"      {summary}"]
    options = getattr(cls, "OPTIONS", None) or {}
    width = max(map(len, options), default=0)
    lines += [f"      {name.ljust(width)}  {help_}" for name, help_ in options.items()] or ["      (no options)"]
    return lines


def _cmd_backends(args: argparse.Namespace) -> int:
    from safetypairs.registry import KINDS, available

    for kind in [args.kind] if args.kind else KINDS:
        sys.stdout.write(f"{kind}:\n")
        for alias in available(kind):
            sys.stdout.write("\n".join(_backend_lines(kind, alias)) + "\n")
    return 0


def _add_backends(sub: argparse._SubParsersAction) -> None:
    from safetypairs.registry import ENTRY_POINT_GROUP, KINDS

    p = sub.add_parser("backends", help="list the registered backends of each kind with their options",
                       description=("List instructors, editors, judges, guards and encoders: built-in ones, those "
                                    "added with safetypairs.registry.register() and those of other packages' "
                                    f"'{ENTRY_POINT_GROUP}' entry points ('<kind>.<alias>' = 'module:Class'). "
                                    "Options go in the spec: alias:<arg>,key=value,..."))
    p.add_argument("kind", nargs="?", choices=KINDS, help="only this kind (default: all)")
    p.set_defaults(func=_cmd_backends)


def _cmd_demo(args: argparse.Namespace) -> int:
    from safetypairs.demo import DemoConfig, run_demo

    config = DemoConfig(out=args.out, n=args.n, overwrite=args.overwrite, seed=args.seed, train=not args.no_train)
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
    p.add_argument("--no-train", action="store_true",
                   help="skip the training section (ocr-text probes: base vs + pairs vs + random extra images)")
    p.set_defaults(func=_cmd_demo)


def _cmd_release(args: argparse.Namespace) -> int:
    from safetypairs.folders import check_not_input
    from safetypairs.hub import PushConfig, layout_files, push_release
    from safetypairs.publish import read_input, write_release
    from safetypairs.release import ReleaseConfig

    config = ReleaseConfig(split_by=args.split_by, test_size=args.test_size, seed=args.seed,
                           include_rejected=not args.no_rejected, max_shard_size=args.max_shard_size,
                           license=args.license, pretty_name=args.name, max_pixels=args.max_pixels)
    push = PushConfig(args.push, private=not args.public, gated=args.gated) if args.push else None
    if args.min_reviewers is not None and not args.require_review:
        raise CLIError("--min-reviewers needs --require-review")
    check_not_input(args.out, (args.input,))
    data = read_input(args.input)
    review = None
    if args.require_review:
        from datasets import Dataset

        from safetypairs.review import load_review

        if not isinstance(data, Dataset):
            raise CLIError("--require-review needs validated rows, not a raw layout")
        review = load_review(args.input, data, args.min_reviewers or 1)
    pushed: list[str] = []
    upload = (lambda work: pushed.append(push_release(work, push))) if push and not args.dry_run else None
    out = write_release(data, args.out, config, overwrite=args.overwrite, inputs=(args.input,), review=review,
                        before_rename=upload)  # a failed upload leaves no folder
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
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--gated", nargs="?", const="auto", choices=["auto", "manual"], default=None,
                   help="gate access behind the card's research-use agreement (auto approval unless 'manual')")
    p.add_argument("--dry-run", action="store_true", help="write the exact hub layout locally and list it; no upload")
    p.add_argument("--require-review", action="store_true",
                   help="release only pairs a majority of reviewers accepted (INPUT/review.jsonl, `safetypairs review`)")
    p.add_argument("--min-reviewers", type=int, default=None,
                   help="with --require-review: reviewers needed per pair (default: 1)")
    _add_max_pixels(p)
    p.set_defaults(func=_cmd_release)


def _cmd_validate(args: argparse.Namespace) -> int:

    from safetypairs.datafiles import read_rows
    from safetypairs.folders import check_not_input
    from safetypairs.runner import RunConfig, session
    from safetypairs.validate import ValidateConfig, validate_run

    config = ValidateConfig(original_column=args.original_column, edited_column=args.edited_column,
                            policy=args.policy, judge=args.judge, lpips=args.lpips, clip=args.clip,
                            device=args.device, size_mismatch=args.size_mismatch, batch_size=args.batch_size,
                            thresholds=args.thresholds, composite=args.composite, max_pixels=args.max_pixels)
    check_not_input(args.out, (args.input,))
    run = RunConfig(out=args.out, chunk_size=args.chunk_size, source=args.input, overwrite=args.overwrite)
    with session(config.device) as state:
        with state.main_process_first():
            rows = read_rows(args.input)  # bad input or settings fail before the output folder is touched
        summary = validate_run(rows, config, run, inputs=(args.input,))
    if summary is not None:  # rank 0 under accelerate launch / torchrun
        sys.stdout.write(summary.render() + "\n")
    return 0


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check that edits are local, real and flip the label (adds validation columns)",
        description=(
            "Read candidates (image, edited_image) or released pairs (unsafe_image, safe_image: recognised by their "
            "columns) from a `safetypairs generate` run folder, a save_to_disk folder or a parquet folder, compute "
            "the change mask, "
            "SSIM/PSNR (and optionally LPIPS/CLIP) outside it and the judge's labels, decide accepted / "
            "reject_reason, and write a run folder (OUT/data/*.parquet + OUT/run.json). Under `accelerate "
            "launch` / `torchrun` each rank validates a contiguous shard; a killed run resumes where it stopped."
        ),
    )
    p.add_argument("input", help="a generate run folder, a datasets.save_to_disk folder or a parquet folder")
    p.add_argument("--out", required=True, help="output run folder (data/*.parquet, run.json); reused to resume")
    p.add_argument("--original-column", default="image", help="the unsafe original (default: image)")
    p.add_argument("--edited-column", default="edited_image", help="the edit (default: edited_image)")
    p.add_argument("--policy", default="llavaguard", help="policy name or YAML path (default: llavaguard)")
    p.add_argument("--judge", help="judge spec, e.g. ocr-lexicon (default: none: a warning, label_flip_checked = "
                                   "false, and the card says no judge checked the flip)")
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
    p.add_argument("--chunk-size", type=int, default=64, help="rows per resumable chunk (default: 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder holding another run")
    _add_max_pixels(p)
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
    from safetypairs.runner import RunConfig, session

    config = EvaluateConfig(guards=tuple(args.guard), policy=args.policy, device=args.device,
                            batch_size=args.batch_size, n_bootstrap=args.bootstrap, seed=args.seed,
                            max_pixels=args.max_pixels)
    natural = _natural_rows(args.natural, args.natural_split) if args.natural else None
    run = RunConfig(out=args.out, chunk_size=args.chunk_size, overwrite=args.overwrite)
    with session(config.device):
        results = evaluate_release(args.dataset, config, run, split=args.split, natural=natural)
    if not results:  # a non-zero rank under accelerate launch / torchrun: rank 0 reports
        return 0
    for row in results["leaderboard"]:
        cells = "  ".join(f"{k}={'-' if row[k] is None else round(row[k], 3)}" for k in ("pair_accuracy", "f1", "auroc"))
        sys.stdout.write(f"{row['guard']}: {cells}  unknown={row['n_unknown']}\n")
    for spec, cmp in (results.get("natural") or {}).items():
        cells = "  ".join(f"{name}={_value_ci(cmp[key])}" for name, key in (
            ("natural_acc", "natural_accuracy"), ("pair_acc", "release_pair_accuracy"), ("gap", "gap_pair_accuracy")))
        sys.stdout.write(f"{spec} natural vs pairs: {cells}\n")
    _write_caveats(results)
    sys.stdout.write(f"wrote {args.out}/results.json, predictions.parquet, report.html\n")
    return 0


def _write_caveats(results: dict) -> None:
    """The results' caveats (circular guards, unchecked label flips), after the numbers they qualify."""
    for spec, note in (results.get("notes") or {}).items():
        sys.stdout.write(f"warning: {spec}: {note}\n")
    for warning in results.get("warnings") or []:
        sys.stdout.write(f"warning: {warning}\n")


def _natural_rows(path: str, split: str | None):
    from safetypairs.embed import load_images
    from safetypairs.natural import natural_images
    from safetypairs.sources import load_source

    if any((Path(path) / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):  # a source image folder
        return natural_images(load_source(path, split or "train"))
    return natural_images(load_images(path, split))


def _mean_ci(cell: dict) -> str:
    return _value_ci({"value": cell["mean"], "ci": None if cell["low"] is None else [cell["low"], cell["high"]]})


def _value_ci(cell: dict) -> str:
    value = "-" if cell["value"] is None else f"{cell['value']:.3f}"
    return value + (f" [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" if cell.get("ci") else "")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate guard models on a released benchmark (metrics, results.json, report.html)",
        description="Run guards over the images config of a release (folder or ORG/NAME) and score them: "
                    "per-image, per-pair and per-category metrics with bootstrap CIs, and a report. Under "
                    "`accelerate launch` / `torchrun` each rank predicts a contiguous shard; a killed run resumes.",
    )
    p.add_argument("--dataset", required=True, help="release folder or hub repo id")
    p.add_argument("--guard", action="append", required=True,
                   help="guard spec, repeatable (hf-vlm:<id>, llavaguard:<id>, clip-zeroshot:<encoder>, ocr-lexicon, "
                        "nudenet, ..., or your own code as package.module:Object: it is imported)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--policy", default="llavaguard", help="policy name or YAML path (default: llavaguard)")
    p.add_argument("--split", default=None, help="split (default: test, else train)")
    p.add_argument("--device", default="auto", help="auto (GPU per rank when present) or a torch device")
    p.add_argument("--batch-size", type=int, default=8, help="images per guard call (default: 8)")
    p.add_argument("--chunk-size", type=int, default=256, help="images per resumable chunk (default: 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder holding another run")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over pairs (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--natural", help="labelled natural images (folder or hub id with image, label; a source image "
                                     "folder or generate run, labelled by rating/label: the rows set aside as "
                                     "not_unsafe are natural negatives): their accuracy is reported beside the "
                                     "release's pair accuracy, with the gap")
    p.add_argument("--natural-split", default=None, help="split of --natural (default: test, else train)")
    _add_max_pixels(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_score(args: argparse.Namespace) -> int:
    from safetypairs.score import ScoreConfig, score_file

    config = ScoreConfig(name=args.name or "", id_column=args.id_column, prediction_column=args.prediction_column,
                         score_column=args.score_column, policy=args.policy, n_bootstrap=args.bootstrap, seed=args.seed)
    results = score_file(args.dataset, args.predictions, args.out, config, split=args.split, overwrite=args.overwrite)
    for row in results["leaderboard"]:
        cells = "  ".join(f"{k}={'-' if row[k] is None else round(row[k], 3)}" for k in ("pair_accuracy", "f1", "auroc"))
        sys.stdout.write(f"{row['guard']}: {cells}  unknown={row['n_unknown']}\n")
    _write_caveats(results)
    sys.stdout.write(f"wrote {args.out}/results.json, predictions.parquet, report.html\n")
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="score predictions made elsewhere (csv/jsonl/parquet keyed by image_id) like evaluate",
        description="Join a predictions file (one row per image of the release's images config: image_id, "
                    "prediction safe/unsafe or 0/1, optional score) with the release's labels and write the same "
                    "metrics, results.json, predictions.parquet and report.html as `safetypairs evaluate`. Images "
                    "with no prediction count as errors.",
    )
    p.add_argument("--dataset", required=True, help="release folder or hub repo id")
    p.add_argument("--predictions", required=True, help="a .csv, .jsonl/.json or .parquet file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="the guard's name in the results (default: file:<file name>)")
    p.add_argument("--id-column", default="image_id", help="image id column (default: image_id)")
    p.add_argument("--prediction-column", default="prediction", help="prediction column (default: prediction)")
    p.add_argument("--score-column", default="score", help="score column, higher = more unsafe (default: score)")
    p.add_argument("--policy", default="llavaguard", help="policy name or YAML path (default: llavaguard)")
    p.add_argument("--split", default=None, help="split (default: test, else train)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over pairs (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_score)


def _cmd_generate(args: argparse.Namespace) -> int:
    from safetypairs.folders import check_not_input
    from safetypairs.generate import GenerateConfig, generate_from_source
    from safetypairs.registry import parse_options
    from safetypairs.runner import RunConfig

    trust = (("trust_remote_code", "true"),) if args.trust_remote_code else ()
    config = GenerateConfig(
        policy=args.policy, instructor=args.instructor, editor=args.editor, candidates=args.candidates,
        control=args.control, seed=args.seed, device=args.device, batch_size=args.batch_size,
        instructor_options=tuple(parse_options(args.instructor_options).items()) + trust,
        editor_options=tuple(parse_options(args.editor_options).items()) + trust, mask_column=args.mask_column,
        max_pixels=args.max_pixels,
    )
    check_not_input(args.out, (args.source,) if Path(args.source).exists() else ())
    run = RunConfig(out=args.out, chunk_size=args.chunk_size, overwrite=args.overwrite)
    summary = generate_from_source(args.source, config, run, split=args.split, columns=_source_columns(args))
    if summary is not None:  # rank 0 under accelerate launch / torchrun
        sys.stdout.write(summary.render() + "\n")
    return 0


def _source_columns(args: argparse.Namespace):
    from safetypairs.sources import SourceColumns

    keep = tuple(c.strip() for c in (args.keep_columns or "").split(",") if c.strip())
    return SourceColumns(image=args.image_column, category=args.category_column, rationale=args.rationale_column,
                         id=args.id_column, label=args.label_column, keep=keep)


def _add_source_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-column", default="image", help="the image column (default: image; an image folder's "
                                                           "metadata names files in file_name)")
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
                   help="an image folder with metadata.jsonl or metadata.csv (file_name, category, rationale, "
                        "rating...), a save_to_disk folder, .parquet file(s), a hub dataset id ORG/NAME, or demo[:n]")
    p.add_argument("--split", default="train", help="source split (default: train)")
    _add_source_columns(p)
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
    p.add_argument("--overwrite", action="store_true", help="replace an output folder holding another run")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model repos' own code (off by default; only for repos you trust)")
    _add_max_pixels(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_review(args: argparse.Namespace) -> int:
    from safetypairs.review_app import ReviewConfig, serve

    config = ReviewConfig(reviewer=args.reviewer, scope=args.only, host=args.host, port=args.port)
    sys.stdout.write(f"review app for {args.reviewer} on http://{args.host}:{args.port} (Ctrl+C to stop)\n")
    sys.stdout.flush()
    serve(args.input, config)
    return 0


def _add_review(sub: argparse._SubParsersAction) -> None:
    from safetypairs.utils import REVIEW_SCOPES

    p = sub.add_parser(
        "review", help="open the review app: accept or reject validated candidates in the browser",
        description="Serve a Gradio page on localhost showing one candidate at a time (original | edit | control | "
                    "change mask, instruction, locality scores, judge verdicts). Decisions are appended to "
                    "INPUT/review.jsonl; several reviewers can work on one folder at once and each resumes where "
                    "they stopped. Keys: A accept, R reject (reason 1-5), S skip, B back.",
    )
    p.add_argument("input", help="validated rows (a validate output folder)")
    p.add_argument("--reviewer", required=True, help="your name, stored with each decision")
    p.add_argument("--only", choices=REVIEW_SCOPES, default="accepted",
                   help="candidates to show by their automatic decision (default: accepted)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.set_defaults(func=_cmd_review)


def _cmd_review_stats(args: argparse.Namespace) -> int:
    from safetypairs.datafiles import read_rows
    from safetypairs.review import agreement, read_decisions, write_stats

    records = read_decisions(args.input)
    if not records:
        raise CLIError(f"no decisions in {args.input}/review.jsonl; run `safetypairs review` first")
    stats = agreement(read_rows(args.input), records)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    sys.stdout.write(f"{stats['records']} decisions ({stats['superseded']} later changed)\n")
    for name, counts in stats["reviewers"].items():
        refs = "  ".join(f"kappa vs {ref[3:]}={fmt(stats[ref][name]['kappa'])} (n={stats[ref][name]['n']})"
                         for ref in ("vs_automatic", "vs_judge") if ref in stats)
        sys.stdout.write(f"{name}: accept={counts['accept']} reject={counts['reject']}  {refs}\n")
    for pair in stats["between_reviewers"]:
        sys.stdout.write(f"{' / '.join(pair['reviewers'])}: kappa={fmt(pair['kappa'])} "
                         f"agreement={fmt(pair['agreement'])} (n={pair['n']})\n")
    sys.stdout.write("reasons: " + (", ".join(f"{k}={v}" for k, v in stats["reasons"].items()) or "none") + "\n")
    sys.stdout.write(f"wrote {write_stats(args.input, stats)}\n")
    return 0


def _add_review_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review-stats", help="review counts and agreement (Cohen's kappa) of a reviewed folder",
                       description="Read INPUT/review.jsonl (each reviewer's last decision counts) and print counts "
                                   "per reviewer and reason, Cohen's kappa between reviewers and of each reviewer "
                                   "with the automatic checks and the judge; also written to INPUT/results.json.")
    p.add_argument("input", help="the reviewed folder")
    p.set_defaults(func=_cmd_review_stats)


def _embed_config(args: argparse.Namespace):
    from safetypairs.embed import EmbedConfig

    return EmbedConfig(encoder=args.encoder, image_column=args.image_column, device=args.device,
                       batch_size=args.batch_size, max_pixels=args.max_pixels)


def _add_embed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True,
                   help="open_clip:<arch>/<pretrained> | hf-clip:<id or path> | ocr-text[:dim=1024,ngrams=2]")
    p.add_argument("--image-column", default="image", help="the image column (default: image)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default: 32)")
    p.add_argument("--device", default="auto", help="auto (the rank's GPU when present) or a torch device")
    _add_max_pixels(p)


def _cmd_embed(args: argparse.Namespace) -> int:
    from safetypairs.embed import load_images, run_embed
    from safetypairs.folders import check_not_input
    from safetypairs.runner import RunConfig, session

    config = _embed_config(args)
    check_not_input(args.out, (args.dataset,) if Path(args.dataset).exists() else ())
    run = RunConfig(out=args.out, chunk_size=args.chunk_size, source=args.dataset, overwrite=args.overwrite)
    with session(config.device) as state:
        with state.main_process_first():
            rows = load_images(args.dataset, args.split)
        summary = run_embed(rows, config, run)
    if summary is not None:  # rank 0 under accelerate launch / torchrun
        sys.stdout.write(summary.render() + "\n")
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="image embeddings of a release or any image dataset (sharded, resumable, cached)",
        description="Embed every image with an encoder into OUT/data/*.parquet (id/label columns, embedding, "
                    "embed_status) + OUT/run.json. A finished OUT with the same encoder and input is reused "
                    "without any encoder call; an interrupted run resumes.",
    )
    p.add_argument("--dataset", required=True, help="release folder or ORG/NAME (images config), dataset folder or hub id")
    p.add_argument("--split", default=None, help="split (default: test, else train)")
    p.add_argument("--out", required=True, help="run folder (data/, run.json)")
    _add_embed_options(p)
    p.add_argument("--chunk-size", type=int, default=256, help="rows per resumable chunk (default: 256)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder holding a different run")
    p.set_defaults(func=_cmd_embed)


def _cmd_train_probe(args: argparse.Namespace) -> int:
    from safetypairs.embed import load_embedded
    from safetypairs.probe import ProbeConfig, train_probe

    config = ProbeConfig(encoder=args.encoder, val_fraction=args.val_fraction, seed=args.seed)
    train = load_embedded(args.train, args.encoder, args.split)
    pairs = load_embedded(args.pairs, args.encoder, args.pairs_split) if args.pairs else None
    probe = train_probe(train, config, args.out, pairs=pairs, embed=_embed_config(args))
    meta = probe.meta
    sys.stdout.write(f"probe on {args.encoder}: {meta['n_train']} rows ({meta['n_unsafe']} unsafe, {meta['n_safe']} "
                     f"safe), C={meta['C']} ({meta['C_selection']})\nsaved to {args.out}; use it as the guard "
                     f"linear-probe:{args.out}\n")
    return 0


def _add_train_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-probe", help="train a linear probe on image embeddings (loads as the guard linear-probe:<out>)",
        description="Fit a class-weighted logistic regression on embeddings of labelled images (C chosen on a "
                    "validation split, grouped by source), optionally adding a release's pairs; save "
                    "probe.safetensors + probe.json naming the encoder.",
    )
    p.add_argument("--train", required=True, help="labelled images (image/embedding + label): folder, hub id or embed run")
    p.add_argument("--split", default=None, help="split of --train (default: test, else train)")
    p.add_argument("--pairs", help="a release (or its embed run) whose originals and edits are added")
    p.add_argument("--pairs-split", default=None, help="split of --pairs (default: test, else train)")
    p.add_argument("--out", required=True, help="probe folder")
    _add_embed_options(p)
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of groups held out to choose C (0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split (default: 0)")
    p.set_defaults(func=_cmd_train_probe)


def _cmd_sample_efficiency(args: argparse.Namespace) -> int:
    from pathlib import Path

    from safetypairs.embed import load_embedded
    from safetypairs.probe import embed_cached
    from safetypairs.sample_efficiency import SweepConfig, run_sample_efficiency

    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError as err:
        raise CLIError(f"--k must be comma-separated integers, got {args.k!r}") from err
    config = SweepConfig(ks=ks, seeds=args.seeds, seed=args.seed, metric=args.metric)
    embed = _embed_config(args)
    cache = Path(args.cache) if args.cache else Path(args.out) / "embeddings"
    sets = {name: embed_cached(load_embedded(path, args.encoder, split), embed, cache, name)
            for name, path, split in (("base", args.base, args.base_split), ("pairs", args.pairs, args.pairs_split),
                                      ("eval", args.eval, args.eval_split))}
    results = run_sample_efficiency(sets["base"], sets["pairs"], sets["eval"], config, args.encoder, out=args.out)
    summary = results["summary"][config.metric]
    for k in summary["arms"]["base"]:
        cells = "  ".join(f"{arm}={_mean_ci(summary['arms'][arm][k])}" for arm in ("base", "pairs", "random"))
        sys.stdout.write(f"k={k:>3}  {cells}\n")
    for k, why in results["skipped"].items():
        sys.stdout.write(f"k={k} skipped: {why}\n")
    sys.stdout.write(f"wrote {args.out}/results.json, curve.png, report.html\n")
    return 0


def _add_sample_efficiency(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample-efficiency", help="probe accuracy vs k: base alone, + k pairs, + k random extra images",
        description="For each k and seed, train a linear probe on k base examples per class alone, with k "
                    "counterfactual pairs added, and with k random extra base images per class added; score "
                    "held-out images sharing no source with training; mean and 95%% CI per k and arm "
                    "(results.json, curve.png, report.html). Embeddings are cached under --cache.",
    )
    p.add_argument("--base", required=True, help="labelled natural images (folder, hub id or embed run)")
    p.add_argument("--pairs", required=True, help="a release (its images config) or its embed run")
    p.add_argument("--eval", required=True, help="held-out labelled images")
    for name in ("base", "pairs", "eval"):
        p.add_argument(f"--{name}-split", default=None, help=f"split of --{name} (default: test, else train)")
    p.add_argument("--out", required=True, help="output folder")
    _add_embed_options(p)
    p.add_argument("--k", default="2,4,8,16,32,64", help="comma-separated k values (default: 2,4,8,16,32,64)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per k (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default: 0)")
    p.add_argument("--metric", default="balanced_accuracy", choices=["balanced_accuracy", "accuracy", "auroc"],
                   help="the plotted metric (default: balanced_accuracy)")
    p.add_argument("--cache", default=None, help="embedding cache folder (default: OUT/embeddings)")
    p.set_defaults(func=_cmd_sample_efficiency)


# Each entry adds one subcommand; stages register theirs here.
# In pipeline order, as `safetypairs --help` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_generate, _add_calibrate, _add_validate, _add_review, _add_review_stats, _add_release,
    _add_evaluate, _add_score, _add_embed, _add_train_probe, _add_sample_efficiency, _add_policies, _add_backends,
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
    except (CLIError, ValueError, OSError) as err:  # OSError: missing/unwritable files and folders
        if args.verbose:
            raise
        sys.stderr.write(f"safetypairs {args.command}: error: {' '.join(str(err).splitlines())}\n")
        return 2
