"""Instruct stage: template and column instructors, status rows for bad input."""

import difflib
import io
import json

import pytest
from datasets import Dataset

from safetypairs import schema as S
from safetypairs.instruct import InstructConfig, run_instruct
from safetypairs.instructions import (
    noop_instruction,
    text_instruction,
    text_replacements,
)
from safetypairs.sources import build_demo_source, demo_photo


def test_text_instruction_round_trip_and_noop():
    text = text_instruction([("YOU ARE A LOSER", "HAVE A NICE DAY")])
    assert text == "Replace the text 'YOU ARE A LOSER' with 'HAVE A NICE DAY'; keep everything else unchanged."
    assert text_replacements(text) == [("YOU ARE A LOSER", "HAVE A NICE DAY")]
    assert text_replacements(noop_instruction(text)) == [("YOU ARE A LOSER", "YOU ARE A LOSER")]
    assert "change nothing" in noop_instruction("Remove the gun")



@pytest.mark.parametrize("pairs", [
    [("YOU'RE A LOSER", "HAVE A NICE DAY")],
    [("LOSER", "IT'S A NICE DAY")],
    [("A", "B"), ("GO AWAY", "DON'T STOP"), ("STUDENTS'", "FRIENDS'")],
])
def test_text_replacements_keep_apostrophes(pairs):
    text = text_instruction(pairs)
    assert text_replacements(text) == pairs
    assert text_replacements(noop_instruction(text)) == [(old, old) for old, _ in pairs]
    assert text_replacements("Replace the text 'X' with 'IT'S OK'. Keep the rest.") == [("X", "IT'S OK")]
    assert text_replacements("replace the text \"X\" with \"Y\" and keep the rest") == [("X", "Y")]

def _rows_with_problems():
    demo = build_demo_source(2)
    rows = demo.to_list()
    png = io.BytesIO()
    demo_photo("coffee").save(png, format="PNG")
    rows.append({**rows[0], S.SOURCE_ID: "weird-cat", S.CATEGORY: "O99"})
    rows.append({**rows[0], S.SOURCE_ID: "corrupt", S.IMAGE: {"bytes": b"not an image", "path": None}})
    rows.append({**rows[0], S.SOURCE_ID: "no-text", S.IMAGE: {"bytes": png.getvalue(), "path": None}})
    rows.append({**rows[0], S.SOURCE_ID: "weapon", S.CATEGORY: "O6", S.RATIONALE: "a pistol aimed at a person"})
    return Dataset.from_list(rows, features=S.SOURCE_FEATURES)


def test_template_instructor_on_real_photos_with_bad_rows():
    out, result = run_instruct(_rows_with_problems(), InstructConfig(device="cpu"))
    assert (result.rows_in, result.rows_out) == (6, 6)
    by_id = {row[S.SOURCE_ID]: row for row in out.remove_columns(S.IMAGE)}  # keeps the corrupt bytes
    for sid in [r for r in by_id if r.startswith("demo-")]:
        row = by_id[sid]
        assert row[S.INSTRUCT_STATUS] == "ok", row[S.INSTRUCT_ERROR]
        (old, new), = text_replacements(row[S.INSTRUCTION])
        rendered = json.loads(row[S.SOURCE_META])["text"]
        assert difflib.SequenceMatcher(None, old, rendered).ratio() > 0.8, (old, rendered)
        assert abs(len(new) - len(old)) <= 8 and row[S.POLICY] == "llavaguard@1.1"
    assert by_id["weird-cat"][S.INSTRUCT_STATUS] == "unknown_category"
    assert "O99" in by_id["weird-cat"][S.INSTRUCT_ERROR] and "weird-cat" in by_id["weird-cat"][S.INSTRUCT_ERROR]
    assert by_id["corrupt"][S.INSTRUCT_STATUS] == "unreadable" and "corrupt" in by_id["corrupt"][S.INSTRUCT_ERROR]
    assert by_id["no-text"][S.INSTRUCT_STATUS] == "no_violation_found"
    assert by_id["weapon"][S.INSTRUCT_STATUS] == "ok" and "pistol" in by_id["weapon"][S.INSTRUCTION]
    assert result.statuses == {"ok": 3, "unknown_category": 1, "unreadable": 1, "no_violation_found": 1}


def test_column_instructor_and_config_errors():
    ds = build_demo_source(2).add_column("my_instr", ["Replace the text 'A' with 'B'", ""])
    out, _ = run_instruct(ds, InstructConfig(instructor="column:my_instr", device="cpu"))
    assert out[S.INSTRUCT_STATUS] == ["ok", "missing_instruction"]
    with pytest.raises(ValueError, match="column 'my_instruction' not in the data"):  # a config error, not error rows
        run_instruct(ds, InstructConfig(instructor="column:my_instruction", device="cpu"))
    with pytest.raises(ValueError, match="Did you mean 'template'"):
        InstructConfig(instructor="templat")
    with pytest.raises(ValueError, match="batch_size"):
        InstructConfig(batch_size=0)


class ForgetfulInstructor:
    """Answers for the first row of a batch only (a backend bug the stage must not turn into a crash)."""

    spec = "forgetful"

    @classmethod
    def from_spec(cls, arg, device="cpu", **_):
        return cls()

    def instruct(self, rows, policy):
        from safetypairs.backends.base import InstructResult

        return [InstructResult(f"edit {rows[0][S.SOURCE_ID]}")]


def test_an_instructor_answering_too_few_rows_is_retried_row_by_row(monkeypatch):
    from safetypairs.backends import registry

    monkeypatch.setitem(registry.REGISTRY["instructors"], "forgetful", f"{__name__}:ForgetfulInstructor")
    registry._load.cache_clear()
    out, result = run_instruct(build_demo_source(3), InstructConfig(instructor="forgetful", device="cpu", batch_size=3))
    registry._load.cache_clear()
    assert result.statuses == {"ok": 3}
    assert out[S.INSTRUCTION] == [f"edit {sid}" for sid in out[S.SOURCE_ID]]
