"""Every command and code block in README.md is exercised: run offline where it can be, parsed where it needs more.

The README is walked in order in one temporary folder, so chained commands reuse each other's output
(one demo run, one generate -> validate -> release -> evaluate chain):

- ```bash``` lines (``&&`` splits commands, ``\\`` continues lines, ``#`` starts comments):
  ``safetypairs ...`` runs in this process when it runs offline: no placeholder, no optional ``[...]`` /
  ``a|b`` syntax, no upload (``--push``), not the review server, and only offline backends (`OFFLINE`).
  Every other ``safetypairs`` command is parsed by the real parser (a renamed flag fails) and its backend
  specs are looked up in the registry (a renamed alias fails). ``accelerate launch`` / ``torchrun`` lines
  are parsed by accelerate's and torch's own parsers, then their ``-m safetypairs`` part as above;
  ``srun ... bash -c '...'`` checks the command inside. ``pip install`` checks the constraints file and the
  extras; ``python -m pytest -m EXPR`` checks that EXPR's markers are registered.
- ```python``` blocks are executed in order (each in a fresh namespace, registry changes undone).
- ```toml``` is parsed and its entry points checked against the registry; the layout block's paths
  must exist; the bibtex entry must be balanced and cite the paper.
- Inline `` `safetypairs ...` `` commands in the prose are parsed like the bash ones.

Substitutions, only where a test must (everything else is run or parsed as written):
`PLACEHOLDERS` for ``<...>`` and ``...``, `SLURM` for the shell expressions inside ``srun``, `SMALL_RUNS`
for the demo sizes (so the whole walk takes about a minute), ``ORG/NAME`` -> the local ``release`` folder in
Python blocks (the hub repo that folder would be pushed to).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from safetypairs import cli
from safetypairs.backends import registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

PLACEHOLDERS = ((re.compile(r"<[^<>\n]+>"), "PLACEHOLDER"), (re.compile(r"(?<!\S)\.\.\.(?!\S)"), "PLACEHOLDER"))
SLURM = {"$(scontrol show hostnames $SLURM_NODELIST | head -1)": "node0", "$SLURM_NNODES": "2",
         "$SLURM_JOB_ID": "1234", "$SLURM_GPUS_ON_NODE": "8", "$SLURM_NODEID": "0"}
SMALL_RUNS = {"demo_n": "4", "demo_source": "demo:4"}  # `demo --n 4 --no-train`; `--source demo:N` -> demo:4
PYTHON_SUBSTITUTIONS = {'"ORG/NAME"': '"release"'}
# Backends whose models ship in wheels (or need none): commands using only these run offline.
OFFLINE = {"template", "column", "ocr-inpaint", "ocr-lexicon", "nudenet", "ocr-text", "linear-probe"}
# Parsed argument -> backend kind, for the registry look-up of specs.
SPEC_ARGS = {"instructor": "instructors", "editor": "editors", "judge": "judges", "guard": "guards",
             "encoder": "encoders", "lpips": "encoders", "clip": "encoders"}
NEVER_RUN = {"review"}  # serves a web page until stopped


@dataclass
class Walk:
    """What the README walk did, for the assertions after it."""

    ran: list[str] = field(default_factory=list)
    parsed: list[str] = field(default_factory=list)
    python_blocks: int = 0
    launchers: list[str] = field(default_factory=list)


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line number)`` of every fenced block."""
    return [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1)
            for m in re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", text, re.M | re.S)]


def shell_commands(code: str) -> list[list[str]]:
    """Token lists of the commands in a bash block (continuations joined, comments dropped, ``&&`` split)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        for pattern, value in PLACEHOLDERS:
            line = pattern.sub(value, line)
        tokens = shlex.split(line, comments=True)
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            commands.append(tokens[:cut])
            tokens = tokens[cut + 1:]
    return commands


def usage_argv(tokens: list[str]) -> tuple[list[str], bool]:
    """Undo usage notation: drop ``[UPPERCASE]``, unwrap ``[...]``, take the first of ``a|b``.

    Returns:
        The argv and whether any notation (or placeholder) was there, i.e. whether it is a template.
    """
    argv, template = [], False
    for token in tokens:
        if re.fullmatch(r"\[[A-Z_]+\]", token):
            template = True
            continue
        plain = token.lstrip("[").rstrip("]")
        if "|" in plain:
            plain = plain.split("|")[0]
        template |= plain != token or "PLACEHOLDER" in plain
        argv.append(plain)
    return argv, template


def parse(argv: list[str], capsys) -> tuple[object | None, set[str]]:
    """Parse with the real CLI parser and look up every backend spec; returns (namespace or None for --help, aliases)."""
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as done:
        assert done.code == 0, f"`safetypairs {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}"
        return None, set()
    aliases = set()
    for name, kind in SPEC_ARGS.items():
        values = getattr(args, name, None)
        for value in [values] if isinstance(values, str) else values or []:
            if value == "PLACEHOLDER":  # `--judge ...`: no spec written out
                continue
            aliases.add(registry.parse_spec(kind, value).alias)  # ValueError "did you mean" for a renamed alias
    return args, aliases


def small(argv: list[str]) -> list[str]:
    """`SMALL_RUNS`: a 4-photo demo without the training section; demo sources of 4 rows."""
    argv = [SMALL_RUNS["demo_source"] if re.fullmatch(r"demo:\d+", a) else a for a in argv]
    if argv[0] == "demo":
        argv = [a for i, a in enumerate(argv) if a != "--n" and (i == 0 or argv[i - 1] != "--n")]
        argv += ["--n", SMALL_RUNS["demo_n"], "--no-train"]
    return argv


def check_safetypairs(tokens: list[str], walk: Walk, capsys, allow_run: bool = True) -> None:
    argv, template = usage_argv(tokens)
    args, aliases = parse(argv, capsys)
    shown = "safetypairs " + " ".join(tokens)
    if args is None:  # --help: printed, exit status 0
        walk.ran.append(shown)
        return
    runnable = (allow_run and not template and args.command not in NEVER_RUN
                and "--push" not in argv and aliases <= OFFLINE)
    if not runnable:
        walk.parsed.append(shown)
        return
    if args.command == "score":
        predictions_file(argv)
    code = cli.main(small(argv))
    out = capsys.readouterr()
    assert code == 0, f"`{shown}` failed ({code}): {out.err[-2000:]}"
    walk.ran.append(shown)


def check_launcher(tokens: list[str], walk: Walk, capsys) -> None:
    """accelerate launch / torchrun: the launcher's own parser, then the safetypairs command (parsed only)."""
    if tokens[0] == "accelerate":
        assert tokens[1] == "launch", tokens
        from accelerate.commands.launch import launch_command_parser

        launched = launch_command_parser().parse_args(tokens[2:])
    else:
        from torch.distributed.run import get_args_parser

        launched = get_args_parser().parse_args(tokens[1:])
    assert launched.module and launched.training_script == "safetypairs", tokens
    walk.launchers.append(tokens[0])
    check_safetypairs(launched.training_script_args, walk, capsys, allow_run=False)


def check_pip(tokens: list[str]) -> None:
    if "-c" in tokens:
        assert (ROOT / tokens[tokens.index("-c") + 1]).is_file()
    target = tokens[tokens.index("-e") + 1]
    extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
    assert extras, f"pip install -e {target}: expected '.' or '.[extras]'"
    for extra in (extras.group(1) or "").split(","):
        assert not extra or extra in PYPROJECT["project"]["optional-dependencies"], f"unknown extra {extra!r}"


# Options of the pytest plugins the README's commands use -> the plugin that must be pinned in the dev extra.
PLUGIN_OPTIONS = {"-n": "pytest-xdist", "--dist": "pytest-xdist", "--randomly-seed": "pytest-randomly",
                  "randomly": "pytest-randomly"}


def check_pytest(tokens: list[str]) -> None:
    expression = tokens[tokens.index("pytest") + 1:]
    markers = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
    if "-m" in expression:
        words = set(re.findall(r"\w+", expression[expression.index("-m") + 1])) - {"not", "and", "or"}
        assert words <= markers, f"unregistered markers {words - markers}"
    dev = [re.split(r"[<>=!~\[ ]", pin)[0] for pin in PYPROJECT["project"]["optional-dependencies"]["dev"]]
    for token in expression:
        plugin = PLUGIN_OPTIONS.get(token.split("=")[0])
        assert plugin is None or plugin in dev, f"{token} needs {plugin} in the dev extra"


def _pytest_line(text: str) -> str:
    """The one ``python -m pytest`` command in ``text`` (its comment dropped)."""
    lines = [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("python -m pytest")]
    assert len(lines) == 1, lines
    return lines[0]


def check_sbatch(code: str, walk: Walk, capsys) -> None:
    """A ```sh block is an sbatch script: bash parses it, and its one ``srun`` line is checked like a bash line."""
    import subprocess

    assert code.startswith("#!/bin/bash\n") and "#SBATCH --nodes" in code
    subprocess.run(["bash", "-n"], input=code, text=True, check=True)
    runs = [tokens for tokens in shell_commands(code) if tokens[0] == "srun"]
    assert len(runs) == 1, runs
    check_command(runs[0], walk, capsys)


def test_ci_runs_exactly_the_readme_test_command():
    """`.ci/run` runs the Set-up section's test command, character for character, random order and workers included."""
    setup = README.read_text(encoding="utf-8").split("## Set-up", 1)[1].split("\n## ", 1)[0]
    command = _pytest_line(setup)
    assert _pytest_line((ROOT / ".ci" / "run").read_text()) == command
    assert {"-n", "--dist"} <= set(shlex.split(command))  # the suite's time on 2 cores needs the workers


def check_command(tokens: list[str], walk: Walk, capsys) -> None:
    head = tokens[0]
    if head == "safetypairs":
        check_safetypairs(tokens[1:], walk, capsys)
    elif head in ("accelerate", "torchrun"):
        check_launcher(tokens, walk, capsys)
    elif head == "srun":
        script = tokens[tokens.index("-c") + 1]
        for expression, value in SLURM.items():
            script = script.replace(expression, value)
        assert "$" not in script, f"unmapped shell expression in {script!r}: add it to SLURM"
        for inner in shell_commands(script):
            check_command(inner, walk, capsys)
    elif head == "pip":
        check_pip(tokens)
    elif tokens[:3] == ["python", "-m", "pytest"]:
        check_pytest(tokens)
    elif tokens[:2] == ["vllm", "serve"]:
        check_vllm(tokens)
    else:
        pytest.fail(f"README command {' '.join(tokens)!r} is not exercised: teach tests/test_readme.py about it")


# `vllm serve` flags the README uses, with how each value must read (vLLM is not installed here: its documented
# flags stand in for its parser; the model must be a hub id as the hub names it).
VLLM_FLAGS = {"--port": int, "--host": str, "--max-model-len": int, "--tensor-parallel-size": int,
              "--served-model-name": str, "--dtype": ("auto", "bfloat16", "float16", "float32"),
              "--limit-mm-per-prompt": "json"}


def check_vllm(tokens: list[str]) -> None:
    import json

    model, rest = tokens[2], tokens[3:]
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", model), f"vllm serve {model!r}: not a hub id ORG/NAME"
    assert len(rest) % 2 == 0, f"vllm serve: flags and values do not pair up: {rest}"
    for flag, value in zip(rest[::2], rest[1::2]):
        kind = VLLM_FLAGS.get(flag)
        assert kind is not None, f"vllm serve {flag}: not a flag the README knows (add it to VLLM_FLAGS)"
        if kind == "json":
            parsed = json.loads(value)
            assert isinstance(parsed, dict) and all(isinstance(v, int) for v in parsed.values()), value
        elif isinstance(kind, tuple):
            assert value in kind, (flag, value)
        else:
            kind(value)


def make_user_folder(code: str) -> None:
    """A ```text block draws a user's folder: the walk makes it (tests/user_data.py writes that layout)."""
    from user_data import make_llavaguard_folder

    assert code.startswith("my_data/"), f"a ```text block must draw the my_data/ folder: {code[:80]!r}"
    make_llavaguard_folder(Path("my_data"))


def predictions_file(argv: list[str]) -> None:
    """`safetypairs score --predictions FILE`: FILE is what a user brings; the walk writes one (all unsafe)."""
    import csv

    from datasets import load_dataset

    path = Path(argv[argv.index("--predictions") + 1])
    if path.exists():
        return
    images = load_dataset(argv[argv.index("--dataset") + 1], "images", split="test")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "prediction"])
        writer.writerows([image_id, "unsafe"] for image_id in images["image_id"])


def run_python(code: str, line: int, walk: Walk) -> None:
    """Run a ```python block; one that starts with ``# <name>.py`` is a file the user writes: it is saved too."""
    first = code.splitlines()[0] if code.strip() else ""
    if first.startswith("# ") and first.endswith(".py") and " " not in first[2:]:
        Path(first[2:]).write_text(code, encoding="utf-8")
    for text, value in PYTHON_SUBSTITUTIONS.items():
        code = code.replace(text, value)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    walk.python_blocks += 1


def check_toml(code: str) -> None:
    entry_points = tomllib.loads(code)["project"]["entry-points"]
    assert set(entry_points) == {registry.ENTRY_POINT_GROUP}
    for name, target in entry_points[registry.ENTRY_POINT_GROUP].items():
        kind, alias = name.split(".", 1)
        assert kind in registry.KINDS and re.fullmatch(r"[\w.]+:\w+", target), (name, target)


def check_layout(code: str) -> None:
    for line in code.splitlines():
        path = line.split()[0]
        assert (ROOT / path).exists(), f"README layout lists {path}, which does not exist"


def check_bibtex(code: str) -> None:
    assert code.count("{") == code.count("}") and "2510.21120" in code and code.lstrip().startswith("@")


@pytest.fixture
def readme_walk(tmp_path, monkeypatch, capsys, isolated_registry):
    """Walk the whole README in order in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # files the README has the user write (my_guards.py) import
    walk = Walk()
    for language, code, line in fenced_blocks(README.read_text(encoding="utf-8")):
        if language == "bash":
            for tokens in shell_commands(code):
                check_command(tokens, walk, capsys)
        elif language == "python":
            run_python(code, line, walk)
        elif language == "toml":
            check_toml(code)
        elif language == "bibtex":
            check_bibtex(code)
        elif language == "":
            check_layout(code)
        elif language == "text":
            make_user_folder(code)
        elif language == "sh":
            check_sbatch(code, walk, capsys)
        else:
            pytest.fail(f"README.md:{line}: a ```{language} block is not exercised: teach tests/test_readme.py")
    return walk


def test_readme_runs_from_nothing_to_a_loaded_release_and_a_report(readme_walk, tmp_path):
    ran = " | ".join(readme_walk.ran)
    for command in ("safetypairs demo", "safetypairs generate", "safetypairs validate", "safetypairs release",
                    "safetypairs evaluate", "safetypairs embed", "safetypairs review-stats", "safetypairs --help"):
        assert command in ran, f"{command} was not run: {ran}"
    assert (tmp_path / "demo_out" / "report.html").is_file() and (tmp_path / "reports" / "run1" / "report.html").is_file()
    assert (tmp_path / "quickstart" / "eval" / "report.html").is_file()
    # the chain generate -> validate -> release -> evaluate: every released pair's three images were scored
    assert (tmp_path / "release" / "README.md").is_file()
    results = json.loads((tmp_path / "reports" / "run1" / "results.json").read_text())
    n_pairs = len(set(results["images"]["pair_id"]))
    assert n_pairs >= 2 and results["n_images"] == 3 * n_pairs
    assert 0 <= results["guards"]["ocr-lexicon"]["metrics"]["pair_accuracy"] <= 1
    assert (tmp_path / "runs" / "validated" / "review.jsonl").is_file()
    assert readme_walk.python_blocks >= 4
    # the GPU and hub commands were parsed (model specs, launchers, the review server, uploads)
    parsed = " | ".join(readme_walk.parsed)
    for fragment in ("hf-vlm:PLACEHOLDER", "diffusers:PLACEHOLDER", "--push", "safetypairs review ",
                     "--require-review", "open_clip:ViT-B-32/openai", "llavaguard:PLACEHOLDER"):
        assert fragment in parsed, f"no parsed command has {fragment}: {parsed}"
    assert sorted(set(readme_walk.launchers)) == ["accelerate", "torchrun"]


def test_inline_commands_in_the_prose_parse(capsys):
    text = README.read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```|<!--.*?-->", "", text, flags=re.M | re.S)  # no blocks, no HTML comments
    inline = re.findall(r"`(safetypairs [^`]+)`", prose)
    assert len(inline) >= 2
    walk = Walk()
    for span in inline:
        for tokens in shell_commands(span):
            check_safetypairs(tokens[1:], walk, capsys, allow_run=False)
    assert len(walk.parsed) + len(walk.ran) == len(inline) and not [c for c in walk.ran if "--help" not in c]


@pytest.mark.parametrize("command, problem", [
    ("safetypairs validate runs/pairs --judgee ocr-lexicon --out x", "does not parse"),
    ("safetypairs evaluate --dataset r --guard ocr-lexicn --out x", "(?i)did you mean"),
    ("torchrun --nprocs_per_node 8 -m safetypairs generate --source x --out y", ""),
    ("safetypairs train --out x", "does not parse"),
    ("make install", "not exercised"),
])
def test_a_renamed_flag_alias_or_command_fails_the_check(command, problem, capsys):
    with pytest.raises((AssertionError, ValueError, SystemExit, pytest.fail.Exception), match=problem or None):
        for tokens in shell_commands(command):
            check_command(tokens, Walk(), capsys)
