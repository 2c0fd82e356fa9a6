"""map_stage: rows in = rows out, output columns present even for an empty dataset."""

from datasets import Dataset

from safetypairs import schema as S
from safetypairs.edit import EditConfig, run_edit
from safetypairs.instruct import InstructConfig, run_instruct


def test_empty_dataset_gets_the_stage_columns():
    empty = Dataset.from_dict({k: [] for k in S.SOURCE_FEATURES}, features=S.SOURCE_FEATURES)
    instructed, result = run_instruct(empty, InstructConfig(device="cpu"))
    assert len(instructed) == 0 and result.statuses == {}
    assert S.INSTRUCTION in instructed.column_names and S.INSTRUCT_STATUS in instructed.column_names
    edited, result = run_edit(instructed, EditConfig(device="cpu", candidates=2))
    assert len(edited) == 0 and result.rows_out == 0
    assert {S.EDITED_IMAGE, S.CONTROL_IMAGE, S.EDIT_STATUS, S.SEED} <= set(edited.column_names)
