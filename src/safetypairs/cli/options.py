"""The argparse options several subcommands share: one helper per shape, each with one help text."""

from __future__ import annotations

import argparse

Parser = argparse.ArgumentParser


def add_out(p: Parser, help_: str) -> None:
    """``--out`` (required): what the command writes, described by ``help_``."""
    p.add_argument("--out", required=True, help=help_)


def add_overwrite(p: Parser, *, run: bool) -> None:
    """``--overwrite``: replace a folder holding another run (``run``: a resumable run folder) or a non-empty one."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output folder holding another run" if run else "replace a non-empty output folder")


def add_chunk_size(p: Parser, default: int, rows: str = "rows") -> None:
    """``--chunk-size``: ``rows`` per resumable chunk of a sharded run."""
    p.add_argument("--chunk-size", type=int, default=default, help=f"{rows} per resumable chunk (default: {default})")


def add_batch_size(p: Parser, default: int, unit: str) -> None:
    """``--batch-size``: how many items (``unit``, e.g. "images per guard call") go to a model at once."""
    p.add_argument("--batch-size", type=int, default=default, help=f"{unit} (default: {default})")


def add_device(p: Parser) -> None:
    """``--device``: ``auto`` or a torch device."""
    p.add_argument("--device", default="auto", help="auto (the rank's GPU when present) or a torch device")


def add_policy(p: Parser) -> None:
    """``--policy``: a built-in policy name or a YAML file."""
    p.add_argument("--policy", default="llavaguard", help="policy name or YAML path (default: llavaguard)")


def add_seed(p: Parser, what: str) -> None:
    """``--seed`` (default 0), described by ``what`` it seeds."""
    p.add_argument("--seed", type=int, default=0, help=f"{what} (default: 0)")


def add_split(p: Parser, of: str | None = None, flag: str = "--split") -> None:
    """A split of a release or labelled image set (``of`` names the option it belongs to); none = test, else train."""
    p.add_argument(flag, default=None, help=f"split{f' of --{of}' if of else ''} (default: test, else train)")


def add_source_split(p: Parser) -> None:
    """``--split`` of a source dataset (default: train)."""
    p.add_argument("--split", default="train", help="source split (default: train)")


def add_bootstrap(p: Parser) -> None:
    """``--bootstrap`` and its ``--seed``: confidence intervals resampled over pairs."""
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over pairs (default: 1000)")
    add_seed(p, "bootstrap seed")


def add_png_level(p: Parser) -> None:
    """``--png-level``: the zlib level of the new images a stage stores in its run folder."""
    from safetypairs.images import RUN_PNG_LEVEL

    p.add_argument("--png-level", type=int, default=RUN_PNG_LEVEL, choices=range(10), metavar="0-9",
                   help=f"zlib level of the PNGs this stage writes into its run folder (default: {RUN_PNG_LEVEL}, fast; "
                        "9: smallest); the pixels are the same at every level, so a run may resume with another")


def add_max_pixels(p: Parser) -> None:
    """``--max-pixels``: the decoding cap of every image the command reads."""
    from safetypairs.images import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image decoded, in pixels (default: {DEFAULT_MAX_PIXELS:,}); larger JPEGs are decoded "
                        "reduced, other larger images get status too_large and a null cell")
