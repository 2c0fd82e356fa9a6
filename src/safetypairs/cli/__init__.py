"""Command line: a thin layer over the ``run_<stage>()`` functions (``safetypairs --help``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from safetypairs.cli.build import add_build, add_demo
from safetypairs.cli.catalog import add_backends, add_policies
from safetypairs.cli.common import RUN_FOLDER_COMMANDS, CLIError, check_inputs
from safetypairs.cli.evaluation import (
    add_embed,
    add_evaluate,
    add_sample_efficiency,
    add_score,
    add_train_probe,
)
from safetypairs.cli.pipeline import (
    add_calibrate,
    add_generate,
    add_release,
    add_validate,
)
from safetypairs.cli.review import add_review, add_review_stats

__all__ = ["CLIError", "build_parser", "main", "set_process_defaults"]

# Commands that only list what is built in: they read no data and never import `datasets`.
CATALOG_COMMANDS = ("policies", "backends")
# Each entry adds one subcommand, in pipeline order, as `safetypairs --help` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_demo, add_generate, add_calibrate, add_validate, add_review, add_review_stats, add_release,
    add_evaluate, add_score, add_embed, add_train_probe, add_sample_efficiency, add_build, add_policies, add_backends,
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
    """Log levels, and with ``quiet`` no progress bars (the variable reaches map and launched processes too)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("RapidOCR", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if quiet:
        os.environ["SAFETYPAIRS_NO_PROGRESS"] = "1"


def _stage_bars_only(command: str) -> contextlib.AbstractContextManager:
    """Only the stages' own bars show while the command runs: `datasets`' bars ("Generating train split", "Map",
    "Flattening the indices") are off for every command that reads data (the catalog commands do not import
    `datasets`); both switches are restored after it (``main`` called in-process)."""
    if command in CATALOG_COMMANDS:
        return contextlib.nullcontext()
    from safetypairs.utils import datasets_progress

    return datasets_progress(False, library=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safetypairs`` command.

    Returns:
        The exit status: 0 on success, 2 for a user error (reported as one line on stderr), 130 when interrupted
        (Ctrl-C: one line says what was kept and how to go on).
    """
    set_process_defaults()
    args = build_parser().parse_args(argv)
    _configure_output(args.verbose, args.quiet)
    try:
        check_inputs(args)
        with _stage_bars_only(args.command):
            return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError) as err:  # OSError: missing/unwritable files and folders
        if args.verbose:
            raise
        sys.stderr.write(f"safetypairs {args.command}: error: {' '.join(str(err).splitlines())}\n")
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        sys.stderr.write(f"\nsafetypairs {args.command}: interrupted; {_kept(args)}\n")
        return 130


def set_process_defaults() -> None:
    """What the ``safetypairs`` command sets for its own process before torch loads; a value the user set wins.

    ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's switch, off by default): CPU tensors of 2 MB or more are backed by
    transparent huge pages (``madvise``), as NumPy does by default for arrays of 4 MB or more. Without it the
    same LPIPS forward ran 10-20% slower inside validation than in a bare loop (same model, inputs and shapes;
    the activations land on 4 KB pages of a busier heap): bench_validate's runner was 1.23x the bare loop,
    and 0.98-1.05x with it. torch reads the variable once, at its first large CPU allocation, so a script or
    notebook that wants the same sets it before importing torch; ``THP_MEM_ALLOC_ENABLE=0`` turns it off.
    It changes where memory lives, never a number computed. Once torch is loaded it is too late, so then (``main``
    called from a script) the environment is left as it is.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: a run folder's finished chunks (resumable), else nothing half-written."""
    out = getattr(args, "out", None)
    if out and args.command in RUN_FOLDER_COMMANDS:
        from safetypairs.engine.folders import output_folder, partial_dir

        return (f"the finished chunks are kept in {partial_dir(output_folder(out))}; run the same command again "
                "to resume (nothing is computed twice)")
    return "nothing half-written was left" + (f" in {out}" if out else "") + "; run the command again"

