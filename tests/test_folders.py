"""Output folders on people's own disks (issue 23 #14, #15): a ``<out>.partial`` the user made is never taken over,
and a symlinked ``--out`` is written through, the link kept, with no ``.old-PID`` sibling left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from release_rows import validated_rows
from runner_job import compute, toy_rows

from safetypairs.cli import main
from safetypairs.engine.datafiles import load_run
from safetypairs.engine.folders import (
    PARTIAL_MARKER,
    OutputDirError,
    atomic_dir,
    open_partial,
    partial_dir,
    read_json,
)
from safetypairs.engine.runner import RunConfig, run_stage


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> Path:
    """Validated rows saved where `safetypairs release` reads them."""
    path = tmp_path_factory.mktemp("validated") / "rows"
    validated_rows(n_sources=3).save_to_disk(str(path))
    return path


def _run(out: Path, calls: list[str] | None = None):
    inner = compute(0.0)

    def counted(rows, device):
        if calls is not None:
            calls.append(rows[0]["row_id"])
        return inner(rows, device)

    return run_stage(toy_rows(5), counted, stage="toy", settings={"version": 1}, run=RunConfig(out, chunk_size=2),
                     device="cpu")


def _leftovers(root: Path) -> list[str]:
    """Every ``.old-PID`` or ``.partial`` path under ``root`` (hidden ones included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".old-" in p.name or p.name.endswith(".partial"))


def test_release_refuses_a_users_own_partial_folder_and_leaves_it_alone(validated, tmp_path, capfd):
    mine = tmp_path / "rel" / "mine.partial"
    mine.mkdir(parents=True)
    (mine / "important.txt").write_text("my notes")
    status = main(["release", str(validated), "--out", str(tmp_path / "rel" / "mine")])
    err = capfd.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and str(mine) in err and "move or delete it" in err
    assert (mine / "important.txt").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == [
        "important.txt"]
    assert not (tmp_path / "rel" / "mine").exists()


def test_a_run_refuses_a_foreign_partial_and_resumes_its_own(tmp_path):
    out = tmp_path / "run"
    partial_dir(out).mkdir()
    (partial_dir(out) / "important.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="did not write"):
        _run(out)
    assert [p.name for p in partial_dir(out).iterdir()] == ["important.txt"] and not out.exists()
    (partial_dir(out) / "important.txt").unlink()  # an empty folder holds nothing to lose: it is taken
    assert _run(out).rows_out == 5 and not partial_dir(out).exists()
    assert PARTIAL_MARKER not in [p.name for p in out.iterdir()]  # the marker never reaches the finished folder


def test_atomic_dir_clears_only_its_own_leftovers(tmp_path):
    out = tmp_path / "out"
    work = open_partial(out)  # what a killed earlier attempt leaves: the marker and half a file
    (work / "half.txt").write_text("half")
    with atomic_dir(out, overwrite=False) as tmp:
        assert sorted(p.name for p in tmp.iterdir()) == sorted([".lock", PARTIAL_MARKER])
        (tmp / "whole.txt").write_text("whole")
    assert [p.name for p in out.iterdir()] == ["whole.txt"] and not work.exists()


def _linked(tmp_path: Path, target: str, link: str) -> tuple[Path, Path]:
    """A folder ``disk/<target>`` and a symlink ``<link>`` to it, as a user with a data disk makes them."""
    folder = tmp_path / "disk" / target
    folder.mkdir(parents=True)
    (tmp_path / link).symlink_to(folder, target_is_directory=True)
    return folder, tmp_path / link


def test_release_writes_through_a_symlinked_out_and_keeps_the_link(validated, tmp_path):
    target, link = _linked(tmp_path, "releases", "rel")
    assert main(["release", str(validated), "--out", str(link)]) == 0
    assert link.is_symlink() and (target / "README.md").is_file()
    first = (target / "README.md").read_text()
    assert main(["release", str(validated), "--out", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and (link / "README.md").read_text() == first
    assert _leftovers(tmp_path) == []


def test_a_run_writes_through_a_symlinked_out_and_resumes_there(tmp_path):
    target, link = _linked(tmp_path, "run", "run")
    first = _run(link)
    assert first.rows_out == 5 and first.chunks_computed == 3
    assert link.is_symlink() and (target / "run.json").is_file() and len(load_run(link)) == 5
    calls: list[str] = []
    again = _run(link, calls)  # the finished run behind the link is found and reused
    assert calls == [] and again.chunks_reused == 3 and link.is_symlink()
    assert _leftovers(tmp_path) == []


def test_generate_writes_through_a_symlinked_out(tmp_path):
    """The same through a run-folder command's CLI: the run lands in the link's target, the link stays."""
    target, link = _linked(tmp_path, "gen", "gen")
    args = ["-q", "generate", "--source", "demo:1", "--instructor", "template", "--editor", "ocr-inpaint",
            "--device", "cpu", "--out", str(link)]
    assert main(args) == 0
    assert link.is_symlink() and (target / "run.json").is_file() and len(load_run(link)) == 1
    first = read_json(target / "run.json")["fingerprint"]
    assert main([*args, "--overwrite", "--seed", "1"]) == 0  # other settings replace the run behind the link
    assert link.is_symlink() and len(load_run(target)) == 1 and read_json(target / "run.json")["fingerprint"] != first
    assert _leftovers(tmp_path) == []
