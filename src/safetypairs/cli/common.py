"""What several subcommands share: the one-line user error."""

from __future__ import annotations

import argparse


class CLIError(Exception):
    """A user error the CLI reports as one line and exit status 2 (no traceback)."""


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    from safetypairs.images import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image decoded, in pixels (default: {DEFAULT_MAX_PIXELS:,}); larger JPEGs are decoded "
                        "reduced, other larger images get status too_large and a null cell")

