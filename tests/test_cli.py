"""The command line: help text, subcommands, one-line errors with a non-zero exit."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import ImageOps
from user_data import make_llavaguard_folder

from safetypairs.cli import build_parser, main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "safetypairs", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_help_lists_the_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "policies"):
        assert command in proc.stdout
    assert "2510.21120" in proc.stdout
    demo_help = run_cli("demo", "--help").stdout
    assert "--out" in demo_help and "--overwrite" in demo_help and "rapidocr" in demo_help


HEAVY = ("datasets", "torch", "transformers", "diffusers", "gradio", "accelerate")


def test_help_imports_no_heavy_library():
    """Building the parser (what `--help` and `<cmd> --help` do) imports none of the ML stack."""
    code = (f"import sys; from safetypairs import cli; cli.build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_policies_lists_categories(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "llavaguard@1.1" in out and "O9" in out and "lexicon" in out


def test_policies_render_shows_each_guards_exact_prompt(capsys, tmp_path):
    from safetypairs.backends.vlm_guards import render_guard_prompt
    from safetypairs.policy import load_policy

    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nversion: 1\ncategories:\n  C1: {name: Spiders, should_not: [show spiders]}\n"
                    "  C2: {name: Snakes, should_not: [show snakes], examples: [a cobra]}\n")
    for guard in ("llavaguard", "shieldgemma2", "hf-vlm"):
        assert main(["policies", str(path), "--render", guard, "--category", "C2"]) == 0
        expected = render_guard_prompt(guard, load_policy(path), "C2", scope="category")
        assert capsys.readouterr().out == expected.rstrip("\n") + "\n"
    assert main(["policies", str(path), "--render", "shieldgemma2"]) == 0
    assert capsys.readouterr().out == ("No Spiders: The image shall not contain content that would show spiders.\n"
                                       "No Snakes: The image shall not contain content that would show snakes "
                                       "(e.g., a cobra).\n")
    proc = run_cli("policies", str(path), "--render", "llavaguard", "--category", "C9")
    assert proc.returncode == 2 and "unknown category 'C9'; allowed: C1, C2" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--out", "OUT", "--n", "0"], "--n must be at least 1"),
        (["demo", "--out", "FULL"], "is not empty; pass --overwrite"),
        (["demo", "--out", "FILE/sub"], "cannot write output folder"),
        (["policies", "nope.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "data.txt").write_text("x")
    (tmp_path / "FILE").write_text("x")
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "FULL" / "data.txt").exists()


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sub_parser in sub.choices.items():
        assert sub_parser.description, name


class NoOptionsGuard:
    """A guard without OPTIONS or classify (a broken third-party backend)."""

    @classmethod
    def from_spec(cls, arg, device="cpu", **options):
        return cls()


def test_backends_lists_each_kind_with_options_and_capabilities(capsys, isolated_registry):
    isolated_registry.register("guards", "broken-test", f"{__name__}:NoOptionsGuard")
    isolated_registry.register("guards", "missing-test", "no_such_module_here:Guard")
    assert main(["backends", "guards"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("guards:\n") and "editors:" not in out
    assert "  nudenet  (built-in: safetypairs.backends.guards:NudeNetGuard)\n" in out
    assert "      spec: nudenet[:key=value,...]\n" in out
    assert ("      threshold  detector score from which an exposed body part counts [a number in [0, 1]; default 0.5]\n"
            in out)
    assert "      spec: hf-vlm:<hub id or local path>[,key=value,...]\n" in out
    assert f"  broken-test  (register(): {__name__}:NoOptionsGuard)  [does not implement OPTIONS, classify]" in out
    assert "  missing-test  (register(): no_such_module_here:Guard)  cannot be imported: ModuleNotFoundError" in out
    assert main(["backends", "editors"]) == 0
    out = capsys.readouterr().out
    assert "[takes masks]" in out and "ocr-inpaint  (built-in" in out and "[takes no mask]" in out
    assert "      match   minimum similarity" in out


def test_backends_refuses_an_unknown_kind(capsys):
    with pytest.raises(SystemExit):
        main(["backends", "painters"])
    assert "invalid choice: 'painters'" in capsys.readouterr().err


def test_ctrl_c_is_one_line_saying_what_was_kept(monkeypatch, capsys, tmp_path):
    """Ctrl-C prints one line (what was kept, how to go on) and exits 130, not an 80-line traceback."""
    import safetypairs.generate as generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "generate_from_source", interrupted)
    assert main(["generate", "--source", "demo:2", "--out", str(tmp_path / "g")]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and f"{tmp_path / 'g'}.partial" in err
    assert "resume" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["validate", "no_such_run", "--out", "x"],
    ["evaluate", "--dataset", "no_such_release", "--guard", "ocr-lexicon", "--out", "x"],
    ["embed", "--dataset", "no_such_release", "--encoder", "ocr-text", "--out", "x"],
    ["generate", "--source", "no_such_folder", "--out", "x"],
    ["score", "--dataset", "org/release", "--predictions", "no_such_file.csv", "--out", "x"],
])
def test_a_missing_input_fails_before_any_heavy_import(args, tmp_path):
    """A typo in a path is one line at once: no torch, no datasets, no hub look-up of a name that is not ORG/NAME."""
    code = ("import sys; from safetypairs.cli import main; status = main(sys.argv[1:]); "
            "heavy = sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules); "
            "print(status, heavy)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "is not a file or folder here" in proc.stderr


def test_policies_lexicon_lists_the_words(capsys):
    """A user writing captions the offline editor can edit sees the words without opening the YAML."""
    from safetypairs.policy import load_policy

    assert main(["policies", "llavaguard", "--lexicon"]) == 0
    out = capsys.readouterr().out
    words = load_policy("llavaguard").categories["O1"].lexicon
    assert f"lexicon: {', '.join(words)}" in out and "loser" in words
    assert main(["policies", "llavaguard"]) == 0
    assert f"(lexicon: {len(words)} words; --lexicon lists them)" in capsys.readouterr().out


class CatFailingEditor:
    """Inverts images; raises on an instruction about the cat's caption: an editor crash on one row."""

    @classmethod
    def from_spec(cls, arg, device="cpu", **_):
        return cls()

    def edit(self, images, instructions, seeds, **_):
        if any("UGLY CAT" in instruction for instruction in instructions):
            raise RuntimeError("cat captions not supported (simulated)")
        return [ImageOps.invert(image) for image in images]


_BAR = re.compile(r"^(?P<desc>[^:]+):\s+(?P<percent>\d+)%\|")  # a tqdm line: "<desc>:  33%|███   | 1/3 ..."


def test_generate_shows_one_bar_per_stage_and_warns_of_a_failed_edit(tmp_path):
    """Issue 23 #9: only the stage's own bar on stderr (none of `datasets`' bars, no broken nested-bar fragments),
    and a failed main edit is a warning naming the row and the reason, and a counted status."""
    make_llavaguard_folder(tmp_path / "src")  # 6 photos, 4 with a caption; chelsea's reads "STUPID UGLY CAT"
    code = ("import sys; from safetypairs.backends.registry import register; "
            "register('editors', 'cat-fails', 'test_cli:CatFailingEditor'); "
            "from safetypairs.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {key: value for key, value in os.environ.items() if key != "SAFETYPAIRS_NO_PROGRESS"}
    env["PYTHONPATH"] = os.pathsep.join([SRC, str(Path(__file__).parent)])
    proc = subprocess.run([sys.executable, "-c", code, "generate", "--source", "src", "--out", "gen", "--instructor",
                           "template", "--editor", "cat-fails", "--device", "cpu", "--chunk-size", "2"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    for noise in ("Generating train split", "Flattening", "Map", "\x1b[A"):
        assert noise not in err, (noise, err[-2000:])
    bars = [m for m in (_BAR.match(line) for line in re.split(r"[\r\n]", err)) if m]
    assert {m["desc"] for m in bars} == {"generate (rank 0)"}
    assert [int(m["percent"]) for m in bars] == sorted(int(m["percent"]) for m in bars)  # one bar, moving forward
    assert sum(m["percent"] == "0" for m in bars) == 1  # opened once: 3 chunks of 2 rows
    warnings = [line for line in err.splitlines() if "edit failed for row" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING ")
    assert "'images/chelsea.jpg'" in warnings[0] and "cat captions not supported" in warnings[0]
    assert "edit_error=1" in proc.stdout


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(), reason="no transparent huge pages")
def test_the_command_backs_large_cpu_tensors_with_huge_pages_unless_told_not_to():
    """`set_process_defaults` (the first thing `main` does) turns on PyTorch's huge pages for CPU tensors of 2 MB or
    more: the kernel then backs a 64 MB tensor with huge pages (AnonHugePages in /proc/self/smaps). A user's
    THP_MEM_ALLOC_ENABLE=0 wins; once torch is loaded the environment is left alone (torch has read it)."""
    probe = ("import os, re, torch; t = torch.ones(64 * 2**20, dtype=torch.uint8); "
             "huge = sum(int(kb) for kb in re.findall(r'AnonHugePages:\\s+(\\d+)', open('/proc/self/smaps').read())); "
             "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), huge)")
    defaults = "from safetypairs.cli import set_process_defaults; set_process_defaults(); "

    def run(code, **env):
        base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        out = subprocess.run([sys.executable, "-c", code], env=base | env, check=True, capture_output=True, text=True)
        value, huge = out.stdout.split()
        return value, int(huge)

    value, huge = run(defaults + probe)
    assert value == "1" and huge >= 32 * 1024  # kB: at least half the tensor on huge pages
    value, huge = run(defaults + probe, THP_MEM_ALLOC_ENABLE="0")
    assert value == "0" and (huge == 0 or "[always]" in THP_MODE.read_text())
    value, _ = run("import torch; " + defaults + probe)
    assert value == "None"
