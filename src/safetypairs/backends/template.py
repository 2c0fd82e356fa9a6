"""Offline instructors: ``template`` (OCR + policy lexicon) and ``column:<name>`` (instructions given in the data)."""

from __future__ import annotations

from typing import Any

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.backends.base import InstructResult
from safetypairs.backends.options import Argument, Option
from safetypairs.backends.ocr import read_text
from safetypairs.instructions import closest_phrase, demo_text, text_instruction
from safetypairs.policy import Policy


class TemplateInstructor:
    """``template``: instructions from the policy and the text detected in the image.

    For a category with a lexicon (O1 in the built-in policy) it reads the image's text with
    rapidocr and asks to replace each offending line with a benign phrase of similar length;
    for other categories it writes a generic "replace the violating element" instruction from
    the row's rationale.
    """

    ARGUMENT = None
    OPTIONS: dict[str, Option] = {}

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu") -> "TemplateInstructor":
        """Build the template instructor (it takes no argument and no options; the registry refuses any)."""
        return cls()

    def instruct(self, rows: list[dict[str, Any]], policy: Policy) -> list[InstructResult]:
        """Write one instruction per row (rows carry ``image``, ``category``, ``rationale``, ``source_id``)."""
        return [self._one(row, policy) for row in rows]

    def _one(self, row: dict[str, Any], policy: Policy) -> InstructResult:
        category = policy.category(row[S.CATEGORY])
        if not category.lexicon:
            element = row.get(S.RATIONALE) or category.name
            instruction = (
                f"Replace the element that violates {category.code} ({category.name}): {element} "
                "with a benign element of similar size and placement; keep everything else unchanged."
            )
            return InstructResult(instruction, element, raw=instruction)
        lines = read_text(row[S.IMAGE])
        flagged = [ln.text for ln in lines if policy.lexicon_matches(ln.text, category.code)]
        raw = " | ".join(ln.text for ln in lines)
        if not flagged:
            return InstructResult(None, None, raw, ST.NO_VIOLATION_FOUND,
                                  f"no {category.code} lexicon words in the detected text {raw!r}")
        benign = demo_text()["benign"]
        pairs = [(text, closest_phrase(text, benign, f"{row[S.SOURCE_ID]}:{text}")) for text in flagged]
        return InstructResult(text_instruction(pairs), " / ".join(flagged), raw)


class ColumnInstructor:
    """``column:<name>``: the instructions are already in a column of the data."""

    ARGUMENT = Argument("<column name>")
    OPTIONS: dict[str, Option] = {}

    def __init__(self, column: str) -> None:
        self.column = column

    @classmethod
    def from_spec(cls, arg: str, device: str = "cpu") -> "ColumnInstructor":
        """Build from the column name (the registry checks it is given and that no option is)."""
        return cls(arg)

    def instruct(self, rows: list[dict[str, Any]], policy: Policy) -> list[InstructResult]:
        """Read each row's instruction; a missing or empty value becomes a status row."""
        results = []
        for row in rows:
            value = row.get(self.column)
            if value is None and self.column not in row:
                raise ValueError(f"column {self.column!r} not in the data; columns: {', '.join(row)}")
            if not isinstance(value, str) or not value.strip():
                results.append(InstructResult(None, None, repr(value), ST.MISSING_INSTRUCTION,
                                              f"column {self.column!r} is empty"))
            else:
                results.append(InstructResult(value.strip(), None, value))
        return results
