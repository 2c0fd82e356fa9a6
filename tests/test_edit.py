"""Edit stage: K candidates with stable seeds, artifact control, per-row failure isolation."""

from dataclasses import dataclass

import pytest
from datasets import Dataset, Image
from PIL import ImageOps

from safetypairs.backends import registry
from safetypairs import schema as S
from safetypairs.edit import EditConfig, candidate_seed, run_edit
from safetypairs.instruct import InstructConfig, run_instruct
from safetypairs.sources import build_demo_source


@dataclass
class FlakyEditor:
    """Inverts images; fails on instructions mentioning 'boom' (a stand-in for an editor crash)."""

    spec: str = "flaky"

    @classmethod
    def from_spec(cls, arg, device="cpu", **_):
        return cls()

    def edit(self, images, instructions, seeds):
        if any("boom" in i for i in instructions):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [ImageOps.invert(im) for im in images]


@pytest.fixture
def flaky_editor(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY["editors"], "flaky", f"{__name__}:FlakyEditor")
    registry._load.cache_clear()
    yield "flaky"
    registry._load.cache_clear()


def _instructed(n=3, instructions=None):
    ds = build_demo_source(n)
    rows = ds.to_list()
    for i, row in enumerate(rows):
        row.update({S.INSTRUCTION: (instructions or [f"edit {i}"] * n)[i], S.INSTRUCT_STATUS: "ok"})
    return Dataset.from_list(rows).cast_column(S.IMAGE, Image())


def test_candidates_get_distinct_stable_seeds_and_one_control(flaky_editor, caplog):
    ds = _instructed(3, ["make it blue", "boom", "make it red"])
    out, result = run_edit(ds, EditConfig(editor=flaky_editor, candidates=2, control=True, seed=7, device="cpu"))
    assert (result.rows_in, result.rows_out) == (3, 6)
    assert out[S.CANDIDATE] == [0, 1, 0, 1, 0, 1]
    assert out[S.SEED][0] != out[S.SEED][1] and out[S.SEED][0] == candidate_seed(7, out[S.SOURCE_ID][0], 0)
    # the editor ignores the seed: candidate 1 equals candidate 0 and is dropped, with a warning
    assert out[S.EDIT_STATUS] == ["ok", "duplicate_candidate", "edit_error", "edit_error", "ok", "duplicate_candidate"]
    assert out[S.EDITED_IMAGE][1] is None and "identical to candidate 0" in out[S.EDIT_ERROR][1]
    assert "dropped 2 candidate(s) identical" in caplog.text
    assert "out of memory" in out[S.EDIT_ERROR][2] and out[S.SOURCE_ID][2] in out[S.EDIT_ERROR][2]
    controls = [c is not None for c in out[S.CONTROL_IMAGE]]
    assert controls == [True, False, True, False, True, False]  # the no-op control of row 1 still ran
    original, edited = out[0][S.IMAGE], out[0][S.EDITED_IMAGE]
    assert edited.size == original.size and list(ImageOps.invert(original).getdata()) == list(edited.getdata())
    assert result.statuses == {"ok": 2, "edit_error": 2, "duplicate_candidate": 2}


def test_seeds_do_not_depend_on_batching(flaky_editor):
    ds = _instructed(3)
    a, _ = run_edit(ds, EditConfig(editor=flaky_editor, candidates=2, batch_size=1, device="cpu"))
    b, _ = run_edit(ds, EditConfig(editor=flaky_editor, candidates=2, batch_size=5, device="cpu"))
    assert a[S.SEED] == b[S.SEED]


def test_rows_without_instruction_are_not_instructed_not_lost(flaky_editor):
    ds = _instructed(2).map(lambda r, i: {S.INSTRUCT_STATUS: "no_violation_found" if i == 0 else "ok"}, with_indices=True)
    out, result = run_edit(ds, EditConfig(editor=flaky_editor, device="cpu"))
    assert out[S.EDIT_STATUS] == ["not_instructed", "ok"] and "no_violation_found" in out[S.EDIT_ERROR][0]



@dataclass
class ShortEditor(FlakyEditor):
    """Returns one image too few for a batch of several (a broken backend)."""

    def edit(self, images, instructions, seeds):
        return super().edit(images, instructions, seeds)[: max(1, len(images) - 1)]


def test_an_editor_returning_too_few_images_does_not_leave_ok_rows_without_an_edit(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY["editors"], "short", f"{__name__}:ShortEditor")
    registry._load.cache_clear()
    out, result = run_edit(_instructed(3), EditConfig(editor="short", control=False, batch_size=3, device="cpu"))
    registry._load.cache_clear()
    assert out[S.EDIT_STATUS] == ["ok"] * 3 and all(img is not None for img in out[S.EDITED_IMAGE])

def test_config_checks():
    with pytest.raises(ValueError, match="Did you mean 'ocr-inpaint'"):
        EditConfig(editor="ocr-inpaintt")
    with pytest.raises(ValueError, match="candidates"):
        EditConfig(candidates=0)
    with pytest.raises(ValueError, match="mask column 'mask' not in the data"):
        run_edit(_instructed(1), EditConfig(editor="diffusers:some/inpainting-model", device="cpu", mask_column="mask"))


def test_a_mask_column_is_refused_when_the_config_is_built_for_an_editor_without_masks():
    with pytest.raises(ValueError, match="editor 'ocr-inpaint' takes no mask, so mask_column='mask' cannot be used; "
                                         "editors that take masks: diffusers$"):
        EditConfig(editor="ocr-inpaint", mask_column="mask")
    with pytest.raises(ValueError, match="editor 'ocr-inpaint:match=0.5' takes no mask"):
        EditConfig(editor="ocr-inpaint:match=0.5", mask_column="mask")
    assert EditConfig(editor="diffusers:some/inpainting-model", mask_column="mask").mask_column == "mask"


def test_ocr_inpaint_through_the_stage_on_real_photos():
    ds, _ = run_instruct(build_demo_source(2), InstructConfig(device="cpu"))
    out, result = run_edit(ds, EditConfig(device="cpu", control=True))
    assert result.statuses == {"ok": 2}
    for row in out:
        assert row[S.EDITED_IMAGE].size == row[S.IMAGE].size and row[S.CONTROL_IMAGE].size == row[S.IMAGE].size


@dataclass
class OutOfMemoryOnceEditor(FlakyEditor):
    """Inverts images and adds the seed to the red channel; the first call of a test raises torch's out-of-memory
    error (an injected OOM); every call's size is recorded. 'boom' instructions still fail (a bad row)."""

    calls = []  # the sizes of the calls of the running test (class-level: the registry builds the instance)

    def edit(self, images, instructions, seeds):
        import torch

        type(self).calls.append(len(images))
        if len(type(self).calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        inverted = super().edit(images, instructions, seeds)
        return [im.point(lambda v, s=seed: (v + s) % 256) for im, seed in zip(inverted, seeds)]


@pytest.fixture
def oom_editor(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY["editors"], "oom-once", f"{__name__}:OutOfMemoryOnceEditor")
    monkeypatch.setattr(OutOfMemoryOnceEditor, "calls", [])
    registry._load.cache_clear()
    yield "oom-once"
    registry._load.cache_clear()


def _rows(out):
    return [(r[S.SOURCE_ID], r[S.EDIT_STATUS], r[S.EDIT_ERROR],
             r[S.EDITED_IMAGE].tobytes() if r[S.EDITED_IMAGE] else None) for r in out]


def test_an_out_of_memory_batch_is_halved_not_run_one_by_one(oom_editor):
    ds = _instructed(4)
    batched, _ = run_edit(ds, EditConfig(editor=oom_editor, batch_size=4, device="cpu"))
    assert OutOfMemoryOnceEditor.calls == [4, 2, 2]  # by hand: 4 does not fit, its halves do
    OutOfMemoryOnceEditor.calls = [-1]  # the reference run: no injected error (its first call is already made)
    alone, _ = run_edit(ds, EditConfig(editor=oom_editor, batch_size=1, device="cpu"))
    assert OutOfMemoryOnceEditor.calls == [-1, 1, 1, 1, 1]
    assert _rows(batched) == _rows(alone) and batched[S.EDIT_STATUS] == ["ok"] * 4


def test_halving_reaches_single_rows_and_a_bad_row_still_fails_alone(oom_editor):
    ds = _instructed(4, ["edit 0", "edit 1", "boom", "edit 3"])
    out, result = run_edit(ds, EditConfig(editor=oom_editor, batch_size=4, device="cpu"))
    # 4 runs out of memory -> 2 (ok) + 2 (one bad row: each of the 2 alone)
    assert OutOfMemoryOnceEditor.calls == [4, 2, 2, 1, 1]
    assert out[S.EDIT_STATUS] == ["ok", "ok", "edit_error", "ok"]
    assert "out of memory (simulated)" in out[S.EDIT_ERROR][2]


def test_isolate_halves_until_the_batch_fits():
    import torch

    from safetypairs.engine.stage import isolate

    sizes = []

    def call(items):
        sizes.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("too big")
        if 5 in items:
            raise ValueError("bad item 5")
        return [i * 10 for i in items]

    out = isolate(call, list(range(8)))
    assert sizes == [8, 4, 2, 2, 4, 2, 1, 1, 2]  # by hand: 8 -> 4 -> 2+2 | 4 -> 2 (holds 5: one by one) + 2
    assert out == [(i * 10, None) if i != 5 else (None, "ValueError: bad item 5") for i in range(8)]
    sizes.clear()
    assert isolate(call, [0, 1, 2]) == [(0, None), (10, None), (20, None)] and sizes == [3, 2, 1]


def test_png_level_changes_the_stored_bytes_not_the_pixels_nor_the_fingerprint(flaky_editor):
    import io

    import numpy as np
    from PIL import Image as PILImage

    from safetypairs.engine.stage import undecoded
    from safetypairs.generate import GenerateConfig, run_settings
    from safetypairs.validate.stage import ValidateConfig

    stored = {}
    for level in (0, 9, None):  # None: the default
        config = EditConfig(editor="flaky", device="cpu", **({} if level is None else {"png_level": level}))
        edited, _ = run_edit(_instructed(2), config)
        stored[level] = [cell["bytes"] for cell in undecoded(edited)[S.EDITED_IMAGE]]
    for raw, packed, default in zip(stored[0], stored[9], stored[None]):
        a, b, c = (PILImage.open(io.BytesIO(png)) for png in (raw, packed, default))
        assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))
        w, h = a.size
        assert len(raw) > w * h * 3 > len(packed)  # uncompressed RGB rows vs the zlib-9 stream of a photo
        # the zlib header's FLEVEL bits (RFC 1950): 0 for levels 0-1, 2 for the default 6, 3 for 7-9
        assert [_zlib_flevel(png) for png in (raw, packed, default)] == [0, 3, 0]  # default: level 1
    assert run_settings(GenerateConfig(png_level=9)) == run_settings(GenerateConfig())
    # validate stores its change masks at its own level
    from safetypairs.validate.stage import run_validate

    for level, flevel in ((9, 3), (None, 0)):
        config = ValidateConfig(device="cpu", **({} if level is None else {"png_level": level}))
        validated, _ = run_validate(edited, config)
        masks = [cell["bytes"] for cell in undecoded(validated)[S.EDIT_MASK] if cell and cell["bytes"]]
        assert masks and {_zlib_flevel(png) for png in masks} == {flevel}, level
    for bad in (10, -1, True):
        with pytest.raises(ValueError, match="png_level must be an integer from 0"):
            ValidateConfig(png_level=bad)
        with pytest.raises(ValueError, match="png_level must be an integer from 0"):
            EditConfig(png_level=bad)


def _zlib_flevel(png: bytes) -> int:
    """FLEVEL of the zlib stream in a PNG's first IDAT chunk, read from the file's chunk layout."""
    import struct

    pos = 8
    while png[pos + 4:pos + 8] != b"IDAT":
        pos += 12 + struct.unpack(">I", png[pos:pos + 4])[0]
    return png[pos + 9] >> 6
