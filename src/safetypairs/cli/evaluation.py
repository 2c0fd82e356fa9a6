"""Subcommands that use a benchmark: evaluate, score, embed, train-probe, sample-efficiency."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetypairs.cli.common import CLIError, run_config, run_sharded
from safetypairs.cli.options import (
    add_batch_size,
    add_bootstrap,
    add_chunk_size,
    add_device,
    add_max_pixels,
    add_out,
    add_overwrite,
    add_policy,
    add_seed,
    add_split,
)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from safetypairs.evaluate.stage import EvaluateConfig, evaluate_run
    from safetypairs.engine.runner import session

    config = EvaluateConfig(guards=tuple(args.guard), policy=args.policy, device=args.device,
                            batch_size=args.batch_size, n_bootstrap=args.bootstrap, seed=args.seed,
                            max_pixels=args.max_pixels, order=args.guard_order)
    natural = _natural_rows(args.natural, args.natural_split) if args.natural else None
    run = run_config(args, args.dataset)
    with session(config.device):
        results = evaluate_run(args.dataset, config, run, split=args.split, natural=natural)
    if results:  # empty on a non-zero rank under accelerate launch / torchrun: rank 0 reports
        _write_results(results, args.out)
    return 0


def _write_results(results: dict, out: str) -> None:
    """The leaderboard, natural-image comparisons and caveats of `evaluate` / `score` results, then the files.

    Raises:
        CLIError: after writing, when a guard answered no image (its numbers measure nothing).
    """
    from safetypairs.evaluate.scoring import unanswered

    for row in results["leaderboard"]:
        cells = "  ".join(f"{k}={'-' if row[k] is None else round(row[k], 3)}" for k in ("pair_accuracy", "f1", "auroc"))
        sys.stdout.write(f"{row['guard']}: {cells}  unknown={row['n_unknown']}\n")
    if results.get("natural_set"):
        sys.stdout.write(f"natural images: {results['natural_set']['sentence']}\n")
    for spec, cmp in (results.get("natural") or {}).items():
        for rate in ("balanced_accuracy", "pair_accuracy"):
            cells = "  ".join(f"{side}={_value_ci(cmp[side][rate])}" for side in ("natural", "release", "gap"))
            sys.stdout.write(f"{spec} {rate} natural vs pairs: {cells}\n")
        sys.stdout.write(f"{spec}: {cmp['finding']}\n")
    # the caveats (circular guards, unchecked label flips), after the numbers they qualify
    for spec, note in (results.get("notes") or {}).items():
        sys.stdout.write(f"warning: {spec}: {note}\n")
    for warning in results.get("warnings") or []:
        sys.stdout.write(f"warning: {warning}\n")
    sys.stdout.write(f"wrote {out}/results.json, predictions.parquet, report.html\n")
    if silent := unanswered(results):
        raise CLIError("; ".join(f"{spec} {warning}" for spec, warning in silent.items())
                       + f" (every prediction failed; the results in {out} count each as an error)")


def _natural_rows(path: str, split: str | None):
    from safetypairs.probes.embed import load_images
    from safetypairs.evaluate.natural import natural_images

    return natural_images(load_images(path, split))


def _mean_ci(cell: dict) -> str:
    return _value_ci({"value": cell["mean"], "ci": None if cell["low"] is None else [cell["low"], cell["high"]]})


def _value_ci(cell: dict) -> str:
    value = "-" if cell["value"] is None else f"{cell['value']:.3f}"
    return value + (f" [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" if cell.get("ci") else "")


def _add_release_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="release folder or hub repo id")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """The ``evaluate`` subcommand."""
    p = sub.add_parser(
        "evaluate", help="evaluate guard models on a released benchmark (metrics, results.json, report.html)",
        description="Run guards over the images config of a release (folder or ORG/NAME) and score them: "
                    "per-image, per-pair and per-category metrics with bootstrap CIs, and a report. Under "
                    "`accelerate launch` / `torchrun` the ranks claim chunks of images as they go; a killed run resumes.",
    )
    _add_release_dataset(p)
    p.add_argument("--guard", action="append", required=True,
                   help="guard spec, repeatable (hf-vlm:<id>, llavaguard:<id>, clip-zeroshot:<encoder>, ocr-lexicon, "
                        "nudenet, ..., or your own code as package.module:Object: it is imported)")
    add_out(p, "output folder")
    add_policy(p)
    add_split(p)
    add_device(p)
    add_batch_size(p, 8, "images per guard call")
    add_chunk_size(p, 256, "images")
    add_overwrite(p, run=True)
    add_bootstrap(p)
    p.add_argument("--guard-order", choices=["chunk", "guard", "auto"], default="auto",
                   help="chunk: every guard over a chunk, then the next (all guards stay in memory); guard: one guard "
                        "over the whole release, unloaded before the next (peak memory = the largest guard); auto "
                        "(default): guard when more than one guard runs in this process on a GPU, else chunk")
    p.add_argument("--natural", help="labelled natural images (folder or hub id with image, label; a source image "
                                     "folder or generate run, labelled by rating/label: the rows set aside as "
                                     "not_unsafe are natural negatives), compared with the pairs per class, as "
                                     "balanced accuracy and as pair accuracy of matched natural pairs; release "
                                     "images (and their sources) and rows outside the policy are left out and counted")
    add_split(p, of="natural", flag="--natural-split")
    add_max_pixels(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_score(args: argparse.Namespace) -> int:
    from safetypairs.evaluate.score import ScoreConfig, score_file

    config = ScoreConfig(name=args.name or "", id_column=args.id_column, prediction_column=args.prediction_column,
                         score_column=args.score_column, policy=args.policy, n_bootstrap=args.bootstrap, seed=args.seed,
                         allow_missing=args.allow_missing)
    results = score_file(args.dataset, args.predictions, args.out, config, split=args.split, overwrite=args.overwrite)
    _write_results(results, args.out)
    return 0


def add_score(sub: argparse._SubParsersAction) -> None:
    """The ``score`` subcommand."""
    p = sub.add_parser(
        "score", help="score predictions made elsewhere (csv/jsonl/parquet keyed by image_id) like evaluate",
        description="Join a predictions file (one row per image of the release's images config: image_id, "
                    "prediction safe/unsafe or 0/1, optional score) with the release's labels and write the same "
                    "metrics, results.json, predictions.parquet and report.html as `safetypairs evaluate`. A file that "
                    "misses images is refused unless --allow-missing (then each counts as an error); unparsable "
                    "predictions and unreadable scores are counted and named.",
    )
    _add_release_dataset(p)
    p.add_argument("--predictions", required=True, help="a .csv, .jsonl/.json or .parquet file")
    add_out(p, "output folder")
    p.add_argument("--name", default=None, help="the guard's name in the results (default: file:<file name>)")
    p.add_argument("--id-column", default="image_id", help="image id column (default: image_id)")
    p.add_argument("--prediction-column", default="prediction", help="prediction column (default: prediction)")
    p.add_argument("--score-column", default="score", help="score column, higher = more unsafe (default: score)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score a file that has no row for some images, each counted as an error (default: refuse it, "
                        "naming them)")
    add_policy(p)
    add_split(p)
    add_bootstrap(p)
    add_overwrite(p, run=False)
    p.set_defaults(func=_cmd_score)


def _embed_config(args: argparse.Namespace):
    from safetypairs.probes.embed import EmbedConfig

    return EmbedConfig(encoder=args.encoder, image_column=args.image_column, device=args.device,
                       batch_size=args.batch_size, max_pixels=args.max_pixels)


def _add_embed_options(p: argparse.ArgumentParser) -> None:
    """The options of `_embed_config`: embed, train-probe and sample-efficiency embed images alike."""
    p.add_argument("--encoder", required=True,
                   help="open_clip:<arch>/<pretrained> | hf-clip:<id or path> | ocr-text[:dim=1024,ngrams=2]")
    p.add_argument("--image-column", default="image", help="the image column (default: image)")
    add_batch_size(p, 32, "images per encoder call")
    add_device(p)
    add_max_pixels(p)


def _cmd_embed(args: argparse.Namespace) -> int:
    from safetypairs.probes.embed import load_images, embed_run

    config = _embed_config(args)
    run = run_config(args, args.dataset)
    return run_sharded(config.device, lambda: load_images(args.dataset, args.split),
                       lambda rows: embed_run(rows, config, run))


def add_embed(sub: argparse._SubParsersAction) -> None:
    """The ``embed`` subcommand."""
    p = sub.add_parser(
        "embed", help="image embeddings of a release or any image dataset (sharded, resumable, cached)",
        description="Embed every image with an encoder into OUT/data/*.parquet (id/label columns, embedding, "
                    "embed_status) + OUT/run.json. A finished OUT with the same encoder and input is reused "
                    "without any encoder call; an interrupted run resumes.",
    )
    p.add_argument("--dataset", required=True, help="release folder or ORG/NAME (images config), image folder with "
                                                   "metadata.jsonl/.csv, dataset folder or hub id")
    add_split(p)
    add_out(p, "run folder (data/, run.json)")
    _add_embed_options(p)
    add_chunk_size(p, 256)
    add_overwrite(p, run=True)
    p.set_defaults(func=_cmd_embed)


def _cmd_train_probe(args: argparse.Namespace) -> int:
    from safetypairs.probes.embed import load_embedded
    from safetypairs.probes.probe import ProbeConfig, train_probe

    config = ProbeConfig(encoder=args.encoder, val_fraction=args.val_fraction, seed=args.seed)
    train = load_embedded(args.train, args.encoder, args.split)
    pairs = load_embedded(args.pairs, args.encoder, args.pairs_split) if args.pairs else None
    probe = train_probe(train, config, args.out, pairs=pairs, embed=_embed_config(args))
    meta = probe.meta
    sys.stdout.write(f"probe on {args.encoder}: {meta['n_train']} rows ({meta['n_unsafe']} unsafe, {meta['n_safe']} "
                     f"safe), C={meta['C']} ({meta['C_selection']})\nsaved to {args.out}; use it as the guard "
                     f"linear-probe:{args.out}\n")
    return 0


def add_train_probe(sub: argparse._SubParsersAction) -> None:
    """The ``train-probe`` subcommand."""
    p = sub.add_parser(
        "train-probe", help="train a linear probe on image embeddings (loads as the guard linear-probe:<out>)",
        description="Fit a class-weighted logistic regression on embeddings of labelled images (C chosen on a "
                    "validation split, grouped by source), optionally adding a release's pairs; save "
                    "probe.safetensors + probe.json naming the encoder.",
    )
    p.add_argument("--train", required=True, help="labelled images (image/embedding + label, or an image folder "
                                                 "whose metadata has rating/label): folder, hub id or embed run")
    add_split(p, of="train")
    p.add_argument("--pairs", help="a release (or its embed run) whose originals and edits are added")
    add_split(p, of="pairs", flag="--pairs-split")
    add_out(p, "probe folder")
    _add_embed_options(p)
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of groups held out to choose C (0.25)")
    add_seed(p, "seed of the validation split")
    p.set_defaults(func=_cmd_train_probe)


def _cmd_sample_efficiency(args: argparse.Namespace) -> int:
    from safetypairs.probes.embed import load_embedded
    from safetypairs.probes.probe import embed_cached
    from safetypairs.probes.sample_efficiency import ARMS, EFFECTS, SweepConfig, run_sample_efficiency

    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError as err:
        raise CLIError(f"--k must be comma-separated integers, got {args.k!r}") from err
    config = SweepConfig(ks=ks, seeds=args.seeds, seed=args.seed, metric=args.metric, n_bootstrap=args.bootstrap)
    embed = _embed_config(args)
    cache = Path(args.cache) if args.cache else Path(args.out) / "embeddings"
    sets = {name: embed_cached(load_embedded(path, args.encoder, split), embed, cache, name)
            for name, path, split in (("base", args.base, args.base_split), ("pairs", args.pairs, args.pairs_split),
                                      ("eval", args.eval, args.eval_split))}
    results = run_sample_efficiency(sets["base"], sets["pairs"], sets["eval"], config, args.encoder, out=args.out)
    sys.stdout.write(f"eval: {results['eval_exclusion']['sentence']}\n")
    summary = results["summary"][config.metric]
    for k in summary["arms"]["base"]:
        cells = "  ".join(f"{arm}={_mean_ci(summary['arms'][arm][k])}" for arm in ARMS)
        effects = "  ".join(f"{name}={_mean_ci(summary['effects'][name][k])}" for name in EFFECTS)
        sys.stdout.write(f"k={k:>3}  {cells}\n       {effects}\n")
    for k, why in results["skipped"].items():
        sys.stdout.write(f"k={k} skipped: {why}\n")
    for line in results["findings"]:
        sys.stdout.write(f"{line}\n")
    sys.stdout.write(f"wrote {args.out}/results.json, curve.png, report.html\n")
    return 0


def add_sample_efficiency(sub: argparse._SubParsersAction) -> None:
    """The ``sample-efficiency`` subcommand."""
    p = sub.add_parser(
        "sample-efficiency", help="probe accuracy vs k: base alone, + k pairs, + k unpaired pair images, + 2k random",
        description="For each k and seed, train a linear probe on k base examples per class alone, + k "
                    "counterfactual pairs, + the same k originals with the edits of k other pairs (unpaired), and + "
                    "k random extra base images per class. Pair structure = pairs - unpaired, more data = random - "
                    "base, each with a 95%% CI over seeds and eval sources. Eval images that are, or share a source "
                    "with, a base or pair image are left out and counted (results.json, curve.png, report.html). "
                    "Embeddings are cached under --cache.",
    )
    p.add_argument("--base", required=True, help="labelled natural images (folder, hub id or embed run)")
    p.add_argument("--pairs", required=True, help="a release (its images config) or its embed run")
    p.add_argument("--eval", required=True, help="held-out labelled images")
    for name in ("base", "pairs", "eval"):
        add_split(p, of=name, flag=f"--{name}-split")
    add_out(p, "output folder")
    _add_embed_options(p)
    p.add_argument("--k", default="2,4,8,16,32,64", help="comma-separated k values (default: 2,4,8,16,32,64)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per k (default: 10)")
    add_seed(p, "run seed")
    p.add_argument("--metric", default="balanced_accuracy", choices=["balanced_accuracy", "auroc", "accuracy"],
                   help="the plotted metric (default: balanced_accuracy; AUROC is always reported beside it)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples behind every interval (1000)")
    p.add_argument("--cache", default=None, help="embedding cache folder (default: OUT/embeddings)")
    p.set_defaults(func=_cmd_sample_efficiency)
