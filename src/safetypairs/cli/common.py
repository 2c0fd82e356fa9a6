"""What several subcommands share when they run: the one-line user error, run folders, the summary."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safetypairs.engine.runner import RunConfig, RunSummary

# Commands that write a run folder on the shared runner: an interrupted one resumes from its finished chunks.
RUN_FOLDER_COMMANDS = ("generate", "validate", "evaluate", "embed")


class CLIError(Exception):
    """A user error the CLI reports as one line and exit status 2 (no traceback)."""


# The arguments that name input data, per command: a local path that must exist here, or (where a hub id is
# allowed) ``ORG/NAME``. Checked before any heavy import, so a typo fails at once, not after torch and a hub timeout.
LOCAL_INPUTS = {"validate": ("input",), "review": ("input",), "review-stats": ("input",), "release": ("input",),
                "score": ("predictions",)}
DATA_INPUTS = {"generate": ("source",), "calibrate": ("source",), "evaluate": ("dataset", "natural"),
               "score": ("dataset",), "embed": ("dataset",), "train-probe": ("train", "pairs"),
               "sample-efficiency": ("base", "pairs", "eval")}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse an input argument that names nothing here and is not a hub id (``ORG/NAME``), reading nothing.

    Raises:
        CLIError: naming the argument and the value.
    """
    for name in LOCAL_INPUTS.get(args.command, ()) + DATA_INPUTS.get(args.command, ()):
        value = getattr(args, name, None)
        if not value or Path(value).expanduser().exists() or any(ch in value for ch in "*?["):
            continue
        if name in DATA_INPUTS.get(args.command, ()) and (_HUB_ID.fullmatch(value) or value == "demo"
                                                           or value.startswith("demo:")):
            continue
        flag = name.upper() if name == "input" else f"--{name}"
        hub = "" if name in LOCAL_INPUTS.get(args.command, ()) else " (a hub dataset id looks like ORG/NAME)"
        raise CLIError(f"{flag} {value!r} is not a file or folder here{hub}")


def check_out(out: str, inputs: tuple[str, ...]) -> None:
    """Refuse an ``--out`` that is, contains or lies inside one of the ``inputs`` that are local paths.

    Raises:
        OutputDirError: naming the input (hub ids and other names that are not local paths are not checked).
    """
    from safetypairs.engine.folders import check_not_input

    check_not_input(out, tuple(path for path in inputs if Path(path).exists()))


def run_config(args: argparse.Namespace, source: str) -> RunConfig:
    """The sharded run folder of ``--out``, ``--chunk-size`` and ``--overwrite``, reading ``source`` (checked
    here, once per command: the stage does not check it again).

    Raises:
        OutputDirError: if ``--out`` is, contains or lies inside ``source`` (when it is a local path).
    """
    from safetypairs.engine.runner import RunConfig

    return RunConfig(out=args.out, chunk_size=args.chunk_size, source=source, overwrite=args.overwrite,
                     inputs=(source,))


def write_summary(summary: RunSummary | None) -> int:
    """Print a run's summary (``None`` on a non-zero rank under accelerate launch / torchrun: rank 0 reports)."""
    if summary is not None:
        sys.stdout.write(summary.render() + "\n")
    return 0


def run_sharded(device: str, load: Callable[[], Any], stage: Callable[[Any], RunSummary | None]) -> int:
    """Load the rows (rank 0 first, so the `datasets` cache is built once), run the stage, print its summary."""
    from safetypairs.engine.runner import session

    with session(device) as state:
        with state.main_process_first():
            rows = load()  # bad input or settings fail before the output folder is touched
        summary = stage(rows)
    return write_summary(summary)


def spec_options(text: str) -> tuple[tuple[str, str], ...]:
    """A backend's ``k=v,k=v`` options flag as the (key, value) pairs a stage config stores."""
    from safetypairs.backends.options import parse_options

    return tuple(parse_options(text).items())
