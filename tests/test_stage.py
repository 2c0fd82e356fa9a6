"""map_stage: rows in = rows out, output columns present even for an empty dataset; isolate: one
failing item fails alone."""

import pytest
from datasets import Dataset, Features, Value

from safetypairs import schema as S
from safetypairs.edit import EditConfig, run_edit
from safetypairs.instruct import InstructConfig, run_instruct
from safetypairs.engine.stage import isolate, map_stage
from safetypairs.utils import progress


def test_empty_dataset_gets_the_stage_columns():
    empty = Dataset.from_dict({k: [] for k in S.SOURCE_FEATURES}, features=S.SOURCE_FEATURES)
    instructed, result = run_instruct(empty, InstructConfig(device="cpu"))
    assert len(instructed) == 0 and result.statuses == {}
    assert S.INSTRUCTION in instructed.column_names and S.INSTRUCT_STATUS in instructed.column_names
    edited, result = run_edit(instructed, EditConfig(device="cpu", candidates=2))
    assert len(edited) == 0 and result.rows_out == 0
    assert {S.EDITED_IMAGE, S.CONTROL_IMAGE, S.EDIT_STATUS, S.SEED} <= set(edited.column_names)


class _Backend:
    """Doubles numbers; raises on negative ones; ``short=True`` drops the last answer of a batch."""

    def __init__(self, short=False):
        self.calls, self.short = [], short

    def __call__(self, items):
        self.calls.append(list(items))
        if any(x < 0 for x in items):
            raise RuntimeError(f"negative input in {items}")
        out = [2 * x for x in items]
        return out[:-1] if self.short and len(items) > 1 else out


def test_isolate_calls_the_batch_once_when_it_succeeds():
    backend = _Backend()
    assert isolate(backend, [1, 2, 3]) == [(2, None), (4, None), (6, None)]
    assert backend.calls == [[1, 2, 3]] and isolate(backend, []) == []


def test_isolate_gives_a_failing_item_its_error_and_the_others_their_results():
    backend = _Backend()
    assert isolate(backend, [1, -2, 3]) == [(2, None), (None, "RuntimeError: negative input in [-2]"), (6, None)]
    assert backend.calls == [[1, -2, 3], [1], [-2], [3]]


def test_isolate_retries_a_wrong_count_item_by_item_and_calls_a_lone_item_once():
    backend = _Backend(short=True)
    assert isolate(backend, [1, 2]) == [(2, None), (4, None)]
    assert backend.calls == [[1, 2], [1], [2]]
    lone = _Backend()
    assert isolate(lone, [-1]) == [(None, "RuntimeError: negative input in [-1]")] and lone.calls == [[-1]]
    assert isolate(lambda items: [], [5]) == [(None, "the backend returned 0 result(s) for 1 item(s)")]


def test_isolate_lets_interrupts_through():
    def interrupted(items):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        isolate(interrupted, [1, 2])


def _statused(batch, rank=None):
    return {"x": batch["x"], "status": ["ok"] * len(batch["x"])}


def test_the_map_bar_shows_outside_the_runner_only(monkeypatch, capsys):
    """Issue 23 #9: `Dataset.map`'s bar is the stage's bar in memory; inside a running bar (the shared runner's
    chunk loop) it stays hidden, and so does a nested library bar."""
    monkeypatch.delenv("SAFETYPAIRS_NO_PROGRESS", raising=False)
    rows = Dataset.from_dict({"x": [1, 2, 3]})
    features = Features({"x": Value("int64"), "status": Value("string")})
    map_stage(rows, _statused, stage="toy", features=features, status_column="status")
    assert "toy: 100%" in capsys.readouterr().err
    for _ in progress([0], desc="outer"):
        map_stage(rows, _statused, stage="toy", features=features, status_column="status")
        list(progress([1, 2], desc="inner"))
    err = capsys.readouterr().err
    assert "outer:   0%" in err and "toy" not in err and "inner" not in err and "\x1b[A" not in err


def test_in_python_the_library_bars_follow_the_users_datasets_switch(monkeypatch, capsys):
    """A notebook quiets every bar with `datasets.disable_progress_bars()`; with `datasets`' bars on, the runner's
    own switching of them (off inside its chunk loop) does not hide its stage bar."""
    from datasets.utils import logging as ds_logging

    from safetypairs.utils import datasets_progress

    monkeypatch.delenv("SAFETYPAIRS_NO_PROGRESS", raising=False)
    rows = Dataset.from_dict({"x": [1, 2, 3]})
    features = Features({"x": Value("int64"), "status": Value("string")})
    ds_logging.disable_progress_bar()
    try:
        map_stage(rows, _statused, stage="toy", features=features, status_column="status")
        list(progress([1, 2], desc="stage"))
        assert capsys.readouterr().err == ""
    finally:
        ds_logging.enable_progress_bar()
    with datasets_progress(False):  # as the runner holds them off around its chunks
        list(progress([1, 2], desc="stage"))
    assert "stage:   0%" in capsys.readouterr().err
    assert ds_logging.is_progress_bar_enabled()
