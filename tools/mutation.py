"""Mutation testing of the core modules with mutmut: how many deliberate one-line bugs survive their tests.

Not part of the default test command (minutes per module). From the repository root, with the dev extra:

    python tools/mutation.py                    # every module in MODULES
    python tools/mutation.py metrics policy     # some of them
    python tools/mutation.py metrics --show     # and the diff of each surviving mutant

Each module runs in its own scratch copy of the checkout (mutmut writes a ``mutants/`` folder beside the code it
mutates), mutating one source file and running only the test files listed for it, so a module takes minutes, not
the whole suite's time per mutant. The output is one line per module: mutants tried, killed, survived, no test
(no listed test calls the function), timed out, and the survival rate; then the surviving mutants by name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "benchmarks", "metrics", "pyproject.toml")  # what the tests import or read
ALSO_COPY = ("benchmarks", "metrics")  # copied into mutmut's own copy besides src, tests and pyproject.toml
PYTEST_ARGS = ("-x", "-p", "no:cacheprovider", "--hypothesis-seed=0")  # stop at the first failure (a kill); the
# property tests draw the same examples on every run


@dataclass(frozen=True)
class Module:
    """One core module: the source file mutated, the tests run against it and the functions counted.

    Attributes:
        source: the file mutmut mutates, relative to the repository root.
        tests: pytest arguments selecting its fast tests (files, ``file::test`` ids).
        functions: names of the functions (``Class.method`` for a method) whose mutants count; empty: all.
    """

    source: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()

    @property
    def dotted(self) -> str:
        """The module's import name (``safetypairs.policy``)."""
        return ".".join(Path(self.source).with_suffix("").parts[1:])

    def patterns(self) -> list[str]:
        """mutmut's names of the counted mutants, as globs (``safetypairs.policy.xǁPolicyǁresolve__mutmut_*``)."""
        names = [f"xǁ{'ǁ'.join(f.split('.'))}" if "." in f else f"x_{f}" for f in self.functions] or ["*"]
        return [f"{self.dotted}.{name}__mutmut_*" for name in names]


MODULES = {
    "metrics": Module("src/safetypairs/evaluate/metrics.py", ("tests/test_metrics.py", "tests/test_properties.py")),
    "decision": Module("src/safetypairs/validate/decision.py", ("tests/test_decision.py",)),
    "policy": Module("src/safetypairs/policy.py", ("tests/test_policy.py", "tests/test_properties.py"),
                     ("Policy.resolve", "_name_key", "is_none_category")),
    "review": Module("src/safetypairs/review/store.py",
                     ("tests/test_review.py::test_kappa_equals_sklearn",
                      "tests/test_review.py::test_a_judge_that_answered_unknown_is_left_out_of_kappa_vs_judge",
                      "tests/test_review.py::test_three_reviewers_two_accept_one_reject_is_a_majority",
                      "tests/test_review.py::test_release_keeps_only_pairs_reviewers_accepted"),
                     ("majority", "agreement", "_kappa", "_reference_labels", "latest_decisions")),
    "card": Module("src/safetypairs/release/card.py", ("tests/test_card.py",),
                   ("size_category", "card_data", "card_stats")),
    "scoring": Module("src/safetypairs/evaluate/scoring.py",
                      ("tests/test_report.py::test_leaderboard_cells_show_each_metric_and_its_interval",
                       "tests/test_report.py::test_a_guard_that_answered_no_image_is_named_in_the_results_and_the_report",
                       "tests/test_evaluate.py::test_guard_columns_are_distinct_and_stable",
                       "tests/test_evaluate.py::test_leaderboard_puts_undefined_after_zero",
                       "tests/test_evaluate.py::test_a_guard_that_raises_marks_only_its_rows"),
                      ("guard_columns", "score_predictions", "leaderboard", "unanswered", "_no_answer", "_labels",
                       "_similarity")),
}


def _toml_list(values: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def prepare(module: Module, workdir: Path) -> None:
    """A scratch copy of the checkout whose ``pyproject.toml`` tells mutmut what to mutate and which tests to run."""
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        elif source.is_file():
            shutil.copy2(source, workdir / name)
    config = (f"\n[tool.mutmut]\nsource_paths = [\"src\"]\nonly_mutate = {_toml_list([module.source])}\n"
              f"also_copy = {_toml_list(ALSO_COPY)}\n"
              f"pytest_add_cli_args = {_toml_list(PYTEST_ARGS)}\n"
              f"pytest_add_cli_args_test_selection = {_toml_list(module.tests)}\n")
    with open(workdir / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write(config)


def run(module: Module, workdir: Path, jobs: int) -> dict[str, str]:
    """Run mutmut on ``module`` in ``workdir``; mutant name -> status (killed, survived, no tests, timeout...).

    Raises:
        RuntimeError: when mutmut fails (its log is named).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    log = workdir / "mutmut.log"
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *module.patterns()],
                              cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"mutmut failed on {module.source} (exit {done.returncode}); see {log}")
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir, env=env,
                             capture_output=True, text=True, check=True).stdout
    statuses = dict(line.strip().rsplit(": ", 1) for line in listing.splitlines() if "__mutmut_" in line)
    return {name: status for name, status in statuses.items()
            if any(fnmatchcase(name, pattern) for pattern in module.patterns())}


def show(name: str, workdir: Path) -> str:
    """mutmut's diff of one mutant."""
    return subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir, capture_output=True,
                          text=True).stdout


def main(argv: list[str] | None = None) -> int:
    """Run the named modules (all by default) and print the survival rate of each.

    Returns:
        0 (the rates are the result; a failing mutmut run raises).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"modules to run (default: all): {', '.join(MODULES)}")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--show", action="store_true", help="print the diff of each surviving mutant")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (mutmut browse works there)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module(s) {unknown}; allowed: {', '.join(MODULES)}")
    for name in args.modules or list(MODULES):
        workdir = Path(tempfile.mkdtemp(prefix=f"safetypairs-mutation-{name}-"))
        try:
            prepare(MODULES[name], workdir)
            statuses = run(MODULES[name], workdir, args.jobs)
            counts = Counter(statuses.values())
            tried = len(statuses) - counts["no tests"] - counts["not checked"]
            rate = counts["survived"] / tried if tried else float("nan")
            print(f"{name:<9} {len(statuses):>4} mutants  {counts['killed']:>4} killed  {counts['survived']:>3} survived  "
                  f"{counts['no tests']:>3} no test  {counts['timeout']:>3} timeout  survival {rate:.1%}", flush=True)
            for mutant in sorted(m for m, s in statuses.items() if s not in ("killed", "timeout")):
                print(f"    {statuses[mutant]}: {mutant}")
                if args.show:
                    print("      " + show(mutant, workdir).replace("\n", "\n      "))
        finally:
            if args.keep:
                print(f"    scratch copy: {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
