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


def _png_at(image, level=None) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({} if level is None else {"compress_level": level}))
    return buffer.getvalue()


def _mask_of(x: int):
    """A 6x4 L mask whose left x columns are set (made in memory, as validation makes its edit masks)."""
    from PIL import Image as PILImage

    mask = PILImage.new("L", (6, 4), 0)
    mask.paste(255, (0, 0, x, 4))
    return mask


def _masks_and_a_jpeg(batch, rank=None):
    """Per row: a new mask, an image opened from JPEG bytes (not made in memory) and the input image unchanged."""
    import io

    from PIL import Image as PILImage

    jpeg = io.BytesIO()
    PILImage.new("RGB", (8, 8), (200, 10, 10)).save(jpeg, format="JPEG")
    return {"mask": [_mask_of(x) for x in batch["x"]], "opened": [PILImage.open(io.BytesIO(jpeg.getvalue()))
                                                                   for _ in batch["x"]],
            "image": batch["image"], "status": ["ok"] * len(batch["x"])}


def test_new_images_are_stored_as_png_at_the_stage_level_and_recorded_beside_the_rows_records():
    import hashlib

    from datasets import Image
    from PIL import Image as PILImage

    original = _png_at(PILImage.new("RGB", (5, 5), (1, 2, 3)))
    before = {"sha256": "a" * 32, "digest": "b" * 16, "pixels": 25}  # the record a run wrote for the input image
    rows = Dataset.from_dict({"x": [1, 4], "image": [{"bytes": original, "path": None}] * 2,
                              S.IMAGE_CHECKS: [[before], [before]]},
                             features=Features({"x": Value("int64"), "image": Image(),
                                                **S.IMAGE_CHECKS_FEATURES}))
    features = Features({**rows.features, "mask": Image(), "opened": Image(), "status": Value("string")})
    out, _ = map_stage(rows, _masks_and_a_jpeg, stage="toy", features=features, status_column="status")
    cells = out.cast_column("mask", Image(decode=False)).cast_column("opened", Image(decode=False))
    cells = cells.cast_column("image", Image(decode=False))
    for x, row in zip((1, 4), cells):
        mask = _mask_of(x)
        assert row["mask"]["bytes"] == _png_at(mask, 1)  # level 1 (RUN_PNG_LEVEL), written out independently
        assert row["image"]["bytes"] == original and row["opened"]["bytes"][:2] == b"\xff\xd8"  # datasets' JPEG
        rgb = mask.convert("RGB").tobytes()
        assert row[S.IMAGE_CHECKS] == [before, {
            "sha256": hashlib.sha256(_png_at(mask, 1)).hexdigest()[:32],
            "digest": hashlib.sha256(b"RGB(6, 4)" + rgb).hexdigest()[:16], "pixels": 24}]

    plain = Dataset.from_dict({"x": [2], "image": [{"bytes": original, "path": None}]},
                              features=Features({"x": Value("int64"), "image": Image()}))
    features = Features({**plain.features, "mask": Image(), "opened": Image(), "status": Value("string")})
    out, _ = map_stage(plain, _masks_and_a_jpeg, stage="toy", features=features, status_column="status", png_level=-1)
    assert S.IMAGE_CHECKS not in out.column_names  # rows that carry no records get none
    assert out.cast_column("mask", Image(decode=False))[0]["mask"]["bytes"] == _png_at(_mask_of(2))  # datasets' level
