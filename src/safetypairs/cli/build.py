"""The ``build`` subcommand: run a recipe's stages in order, each in its own run folder under ``--out``.

A recipe's fields are the stage commands' own options: the schema is read from their parsers (`stage_schema`), and
each stage runs as its command does (`_run_stage` parses the words the recipe gives and calls the command), so the
runner's fingerprints, resumption, sharding and one-line errors are the commands' own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetypairs.cli.common import RUN_FOLDER_COMMANDS, CLIError, check_inputs
from safetypairs.cli.evaluation import add_evaluate, add_sample_efficiency
from safetypairs.cli.options import add_out, add_seed
from safetypairs.cli.pipeline import add_generate, add_release, add_validate
from safetypairs.recipe import (
    LINKS,
    REVIEW,
    STAGES,
    STATE_FILE,
    Field,
    Recipe,
    RecipeError,
    Step,
)

# Release options the build applies itself after the card carries the recipe (the upload comes last).
PUSH_FIELDS = ("push", "public", "gated")
SLURM_NOTE = "under torchrun / accelerate launch every rank runs the build; sharded stages shard, the rest run on rank 0"


def _field(action: argparse.Action) -> Field:
    """A recipe field from one option of a stage command's parser."""
    if isinstance(action, argparse._StoreTrueAction):
        kind = "bool"
    elif isinstance(action, argparse._AppendAction):
        kind = "list"
    else:
        kind = {int: "int", float: "float"}.get(action.type, "str")
    flag = action.option_strings[-1] if action.option_strings else ""
    return Field(name=action.dest, flag=flag, kind=kind, default=action.default, required=bool(action.required),
                 choices=tuple(action.choices) if action.choices else None, help=action.help or "")


# The stage commands a build runs, added by their own functions (the options a recipe's fields are).
STAGE_COMMANDS = (add_generate, add_validate, add_release, add_evaluate, add_sample_efficiency)


def _stages_parser() -> argparse.ArgumentParser:
    """A parser of the stage commands only, as ``safetypairs`` declares them."""
    parser = argparse.ArgumentParser(prog="safetypairs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in STAGE_COMMANDS:
        add(sub)
    return parser


def _stage_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _stages_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {stage: sub.choices[stage] for stage in STAGES}


def stage_schema() -> dict[str, tuple[Field, ...]]:
    """Each stage's recipe fields: every option its command declares (help and the build's own left out)."""
    return {stage: tuple(_field(a) for a in parser._actions if not isinstance(a, argparse._HelpAction))
            for stage, parser in _stage_parsers().items()}


def load_recipe(args: argparse.Namespace, schema: dict[str, tuple[Field, ...]]) -> Recipe:
    """The recipe named by ``RECIPE`` or recorded in the card of ``--from-release``, checked (no model loads)."""
    from safetypairs import recipe as R

    if bool(args.recipe) == bool(args.from_release):  # --print-schema needs neither
        raise CLIError("give a RECIPE file (or built-in name) or --from-release, not both and not neither")
    if args.from_release:
        from safetypairs.release.card import recorded_recipe

        card = _release_card(args.from_release)
        recipe = R.from_mapping(recorded_recipe(card), schema, where=str(card))
    else:
        recipe = R.load(args.recipe, schema)
    for stage, values in recipe.stages.items():
        link = LINKS.get(stage, ("", ""))[0]
        try:
            check_inputs(argparse.Namespace(command=stage, **{**values, link: None}))
        except CLIError as err:
            raise CLIError(f"recipe {stage}: {err}") from err
    R.check_backends(recipe)
    return R.resolve(recipe, schema)


def _release_card(where: str) -> Path:
    """A release's ``README.md``: in a folder here, or downloaded from the hub dataset ``ORG/NAME``."""
    folder = Path(where).expanduser()
    if folder.is_dir():
        if not (folder / "README.md").is_file():
            raise CLIError(f"--from-release {where!r}: no README.md card in this folder")
        return folder / "README.md"
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(where, "README.md", repo_type="dataset"))


def _argv(stage: str, values: dict[str, Any], fields: dict[str, Field], out: Path) -> list[str]:
    """The command words that run ``stage`` as the recipe says, into ``out/<stage>``, reading the stage before."""
    words = [stage, "--out", str(out / stage), "--overwrite"]
    if stage in LINKS:
        link, before = LINKS[stage]
        flag = fields[link].flag
        words += [str(out / before)] if not flag else [flag, str(out / before)]
    for name, value in values.items():
        if not (stage == "release" and name in PUSH_FIELDS):
            words += fields[name].argv(value)
    return words


def _gate(recipe: Recipe, out: Path) -> tuple[int, int, str]:
    """The review gate: pairs still waiting, accepted pairs, and how to start the review app."""
    from safetypairs.recipe import review_waiting

    min_reviewers = recipe.fields("release").get("min_reviewers") or 1
    waiting, accepted = review_waiting(out / "validate", min_reviewers)
    how = (f"start the review app with `safetypairs review {out / 'validate'} --reviewer NAME` "
           f"({min_reviewers} reviewer(s) per pair), then run the build again")
    return waiting, accepted, how


def _print_plan(steps: list[Step], recipe: Recipe, out: Path) -> None:
    sys.stdout.write(f"plan for {recipe.name} in {out}:\n")
    validated = any(s.stage == "validate" and s.action == "reuse" for s in steps)
    for step in steps:
        line = step.render()
        if step.stage == REVIEW and validated:
            waiting, accepted, _ = _gate(recipe, out)
            line += f" ({waiting} of {accepted} accepted pairs wait)" if waiting else " (met: every pair decided)"
        elif step.stage == REVIEW:
            line += " (checked once validate has run)"
        sys.stdout.write(line + "\n")


def _rank() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun / accelerate launch set them)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def _one_process_group(device: str) -> Iterator[Any]:
    """Under torchrun / accelerate launch: one process group for the whole build, torn down once at its end.

    Each stage's `runner.session` tears its group down when it ends (right for a command run alone); a second
    group made in the same process would find the first one's addresses in the launcher's store. accelerate keeps
    the group of a state made with ``FORK_LAUNCHED=1`` (its ``destroy_process_group`` is then a no-op; every
    `PartialState()` reads the variable again), so the build sets it while it runs and the stages share one group.
    Yields ``None`` for a single process.
    """
    if _rank()[1] == 1:
        yield None
        return
    import torch.distributed as dist

    from safetypairs.engine.runner import process_state

    before = os.environ.get("FORK_LAUNCHED")
    os.environ["FORK_LAUNCHED"] = "1"
    try:
        yield process_state(device)
    finally:
        if before is None:
            os.environ.pop("FORK_LAUNCHED", None)
        else:
            os.environ["FORK_LAUNCHED"] = before
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_stage(stage: str, recipe: Recipe, fields: dict[str, Field], out: Path, state: Any) -> None:
    """Run one stage as its command (parse the words, check the inputs, call it): on every rank when it shards, else
    on rank 0 only (``state``: the launched processes' state, ``None`` for one process).

    Raises:
        CLIError: when the command ends with a non-zero status.
    """
    args = _stages_parser().parse_args(_argv(stage, recipe.fields(stage), fields, out))
    if stage in RUN_FOLDER_COMMANDS or state is None or state.is_main_process:
        check_inputs(args)
        status = int(args.func(args) or 0)
        if status:
            raise CLIError(f"{stage} ended with status {status}")


def _after_release(recipe: Recipe, out: Path, command: str) -> None:
    """Rank 0: the card carries the resolved recipe, then (if the recipe says so) the release is uploaded."""
    from safetypairs.recipe import provenance, to_mapping
    from safetypairs.release.card import add_provenance

    resolved = to_mapping(Recipe(recipe.name, recipe.stages, provenance(recipe)))
    add_provenance(out / "release", resolved, command)
    values = recipe.fields("release")
    if values.get("push") and not values.get("dry_run"):
        from safetypairs.release.hub import PushConfig, push_release

        url = push_release(out / "release", PushConfig(values["push"], private=not values.get("public"),
                                                       gated=values.get("gated")))
        sys.stdout.write(f"pushed: {url}\n")


def _cmd_build(args: argparse.Namespace) -> int:
    from safetypairs.recipe import json_schema, plan

    schema = stage_schema()
    if args.print_schema:
        sys.stdout.write(json.dumps(json_schema(schema), indent=1) + "\n")
        return 0
    if not args.out:
        raise CLIError("--out is required (the build folder)")
    try:
        recipe = load_recipe(args, schema)
        out = Path(args.out).expanduser()
        steps = plan(recipe, out, start=args.start, until=args.until)
    except RecipeError as err:
        raise CLIError(str(err)) from err
    rank, _ = _rank()
    if rank == 0:  # rank 0 reports, as every stage does
        _print_plan(steps, recipe, out)
    if args.dry_run:
        return 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    with _one_process_group(args.device) as state:
        _run_steps(steps, recipe, schema, out, state, f"safetypairs build --from-release <this release> --out {args.out}")
    if rank == 0:
        sys.stdout.write(f"build {recipe.name}: done in {out}\n" if all(s.action != "stop" for s in steps)
                         else f"build {recipe.name}: stopped after --until {args.until} in {out}\n")
    return 0


def _run_steps(steps: list[Step], recipe: Recipe, schema: dict[str, tuple[Field, ...]], out: Path, state: Any,
               rebuild: str) -> None:
    """Each step of the plan: the review gate, a stage run (rank 0 records it), a reused stage left as it is."""
    from safetypairs.recipe import record_stage

    rank, _ = _rank()
    for step in steps:
        if step.action == "gate":
            waiting, accepted, how = _gate(recipe, out)
            if waiting:
                raise CLIError(f"review gate: {waiting} of {accepted} accepted pairs wait for a review decision; {how}")
        elif step.action == "run":
            fields = {f.name: f for f in schema[step.stage]}
            _run_stage(step.stage, recipe, fields, out, state)
            if step.stage == "release" and rank == 0:
                _after_release(recipe, out, rebuild)
            if rank == 0:
                record_stage(out, step.stage, step.key, recipe.fields(step.stage))
            if state is not None:
                state.wait_for_everyone()  # the others wait while rank 0 finishes and records the stage


def _demo_folder(out: Path, overwrite: bool) -> None:
    """Check the demo's output folder before any work: a folder holding an earlier demo build is continued (finished
    stages reused); any other non-empty folder only with ``overwrite`` (emptied first), which also starts a build
    afresh.

    Raises:
        OutputDirError: when ``out`` is not a folder, is non-empty without ``overwrite``, or cannot be written.
    """
    import shutil

    from safetypairs.engine.folders import OutputDirError, check_output_folder

    if overwrite or not (out / STATE_FILE).is_file():
        check_output_folder(out, overwrite)
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot write output folder {str(out)!r}: {err.strerror or err}") from err


def _cmd_demo(args: argparse.Namespace) -> int:
    """``safetypairs demo``: build the built-in recipe ``demo`` in ``--out``, then the demo's training and report."""
    from safetypairs import recipe as R
    from safetypairs.demo import DemoConfig, demo_recipe, finish_demo
    from safetypairs.engine.folders import output_folder

    config = DemoConfig(out=args.out, n=args.n, overwrite=args.overwrite, seed=args.seed, train=not args.no_train)
    out = output_folder(Path(config.out).expanduser())  # through a symbolic link, as every command writes
    schema = stage_schema()
    recipe = R.resolve(R.from_mapping(demo_recipe(config), schema, where="demo"), schema)
    _demo_folder(out, config.overwrite)
    with _one_process_group("auto") as state:
        _run_steps(R.plan(recipe, out), recipe, schema, out, state, "safetypairs demo")
    if _rank()[0] == 0:
        sys.stdout.write(finish_demo(config, out).render() + "\n")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    """The ``demo`` subcommand: the built-in recipe ``demo``, built in ``--out``, then its training and report."""
    p = sub.add_parser(
        "demo",
        help="build a real benchmark offline from bundled photos (O1 harassment text overlays)",
        description=(
            "Build the built-in recipe `demo` (safetypairs build demo) offline with real pretrained models that ship "
            "in wheels: skimage photos with harassing captions -> template instructions -> rapidocr + OpenCV "
            "inpainting edits (with artifact controls) -> validation (change mask, SSIM/PSNR outside it, "
            "OCR judge) -> a hub-layout release -> guard evaluation (ocr-lexicon, nudenet), each stage in "
            "OUT/<stage>; then probes on the pairs (training section) and OUT/report.html. A folder holding an "
            "earlier demo build is continued (finished stages reused)."
        ),
    )
    add_out(p, "output folder (generate/, validate/, release/, evaluate/, training/, report.html, results.json)")
    p.add_argument("--n", type=int, default=24, help="number of source images (default: 24)")
    add_seed(p, "seed for captions, fonts, placement and the bootstrap")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder (an earlier demo build is rebuilt from the start)")
    p.add_argument("--no-train", action="store_true",
                   help="skip the training section (ocr-text probes: base, + pairs, + unpaired pair images, "
                        "+ random images)")
    p.set_defaults(func=_cmd_demo)


def add_build(sub: argparse._SubParsersAction) -> None:
    """The ``build`` subcommand."""
    p = sub.add_parser(
        "build", help="build a whole benchmark from a recipe (YAML): each stage in OUT/<stage>, finished ones reused",
        description=(
            "Run a recipe's stages in order (generate, validate, [review gate], release, evaluate, "
            "sample-efficiency), each in its own run folder OUT/<stage>. A recipe field means what the stage "
            "command's option of the same name means (editor_options = --editor-options). A finished stage whose "
            "settings and input are unchanged is reused; an interrupted one resumes. With release.require_review the "
            "build stops (exit 2) until reviewers have decided on every accepted pair. Built-in recipes: demo, "
            f"paper, your-data. The release's card carries the resolved recipe; {SLURM_NOTE}."
        ),
    )
    p.add_argument("recipe", nargs="?", help="a recipe YAML file or a built-in recipe name (demo, paper, your-data)")
    p.add_argument("--out", help="build folder (one run folder per stage, build.json)")
    p.add_argument("--from-release", help="re-plan the recipe recorded in a release's card (folder or hub ORG/NAME)")
    p.add_argument("--from", dest="start", choices=STAGES, help="start at this stage; earlier ones are taken as they are")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")
    p.add_argument("--dry-run", action="store_true", help="print the plan (which stages run or are reused, and why)")
    p.add_argument("--print-schema", action="store_true",
                   help="print the recipe's JSON schema (every stage option, read from the commands) and exit")
    p.add_argument("--device", default="auto",
                   help="under torchrun / accelerate launch: the device kind of the process group the stages share "
                        "(auto: NCCL with CUDA, else gloo); each stage's own device is its recipe field")
    p.set_defaults(func=_cmd_build)
