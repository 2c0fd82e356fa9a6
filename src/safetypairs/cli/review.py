"""Human review subcommands: review (the app) and review-stats (agreement)."""

from __future__ import annotations

import argparse
import sys

from safetypairs.cli.common import CLIError
from safetypairs.utils import REVIEW_SCOPES


def _cmd_review(args: argparse.Namespace) -> int:
    from safetypairs.review.app import ReviewConfig, serve

    config = ReviewConfig(reviewer=args.reviewer, scope=args.only, host=args.host, port=args.port)

    def announce(url: str) -> None:
        sys.stdout.write(f"review app for {args.reviewer} on {url} (Ctrl+C to stop)\n")
        sys.stdout.flush()

    serve(args.input, config, announce)
    return 0


def add_review(sub: argparse._SubParsersAction) -> None:
    """The ``review`` subcommand."""
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
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0: a free port, printed)")
    p.set_defaults(func=_cmd_review)


def _cmd_review_stats(args: argparse.Namespace) -> int:
    from safetypairs.engine.datafiles import read_rows
    from safetypairs.review.store import agreement, read_decisions, write_stats

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


def add_review_stats(sub: argparse._SubParsersAction) -> None:
    """The ``review-stats`` subcommand."""
    p = sub.add_parser("review-stats", help="review counts and agreement (Cohen's kappa) of a reviewed folder",
                       description="Read INPUT/review.jsonl (each reviewer's last decision counts) and print counts "
                                   "per reviewer and reason, Cohen's kappa between reviewers and of each reviewer "
                                   "with the automatic checks and the judge; also written to INPUT/review_stats.json.")
    p.add_argument("input", help="the reviewed folder")
    p.set_defaults(func=_cmd_review_stats)

