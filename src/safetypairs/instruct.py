"""Instruct stage: write a policy-aware edit instruction for each source row."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from safetypairs import schema as S
from safetypairs.ocr import read_text
from safetypairs.policy import Policy, load_policy
from safetypairs.registry import load_backend, parse_spec
from safetypairs.stage import StageResult, map_stage
from safetypairs.utils import ImageError, load_image

logger = logging.getLogger(__name__)

NOOP_INSTRUCTION = "Keep the image exactly as it is; change nothing."
# A closing quote is one not followed by a letter or another quote, so "IT'S" or "FRIENDS'" stay whole.
_REPLACE_TEXT = re.compile(r"""replace the text (['"])(?P<old>.+?)\1 with (['"])(?P<new>.*?)\3(?![\w'"])""",
                           re.IGNORECASE)


@dataclass(frozen=True)
class InstructResult:
    """One instructor answer: the instruction, the targeted element, the raw output and a status."""

    instruction: str | None
    element: str | None = None
    raw: str = ""
    status: str = S.OK
    error: str | None = None


def text_replacements(instruction: str) -> list[tuple[str, str]]:
    """The ``(old, new)`` pairs of every "Replace the text 'X' with 'Y'" clause of an instruction."""
    return [(m["old"], m["new"]) for m in _REPLACE_TEXT.finditer(instruction or "")]


def text_instruction(replacements: list[tuple[str, str]]) -> str:
    """Write a text-replacement instruction that `text_replacements` parses back."""
    clauses = "; ".join(f"replace the text '{old}' with '{new}'" for old, new in replacements)
    return clauses[:1].upper() + clauses[1:] + "; keep everything else unchanged."


def noop_instruction(instruction: str) -> str:
    """The artifact-control instruction: re-render the same text, or ask for no change at all."""
    pairs = text_replacements(instruction)
    return text_instruction([(old, old) for old, _ in pairs]) if pairs else NOOP_INSTRUCTION


def closest_phrase(text: str, phrases: list[str], key: str) -> str:
    """The phrase closest in length to ``text``; ties broken by a stable hash of ``key``."""

    def rank(phrase: str) -> tuple[int, str]:
        return abs(len(phrase) - len(text)), hashlib.sha256(f"{key}:{phrase}".encode()).hexdigest()

    return min(phrases, key=rank)


class TemplateInstructor:
    """``template``: instructions from the policy and the text detected in the image.

    For a category with a lexicon (O1 in the built-in policy) it reads the image's text with
    rapidocr and asks to replace each offending line with a benign phrase of similar length;
    for other categories it writes a generic "replace the violating element" instruction from
    the row's rationale.
    """

    spec = "template"

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **_: Any) -> "TemplateInstructor":
        """Build the template instructor (it takes no argument).

        Raises:
            ValueError: when an argument is given.
        """
        if arg:
            raise ValueError(f"the template instructor takes no argument, got {arg!r}")
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
        from safetypairs.sources import demo_text

        lines = read_text(row[S.IMAGE])
        flagged = [ln.text for ln in lines if policy.lexicon_matches(ln.text, category.code)]
        raw = " | ".join(ln.text for ln in lines)
        if not flagged:
            return InstructResult(None, None, raw, "no_violation_found",
                                  f"no {category.code} lexicon words in the detected text {raw!r}")
        benign = demo_text()["benign"]
        pairs = [(text, closest_phrase(text, benign, f"{row[S.SOURCE_ID]}:{text}")) for text in flagged]
        return InstructResult(text_instruction(pairs), " / ".join(flagged), raw)


class ColumnInstructor:
    """``column:<name>``: the instructions are already in a column of the data."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.spec = f"column:{column}"

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **_: Any) -> "ColumnInstructor":
        """Build from the column name.

        Raises:
            ValueError: when no column is named.
        """
        if not arg:
            raise ValueError("the column instructor needs a column name: column:<name>")
        return cls(arg)

    def instruct(self, rows: list[dict[str, Any]], policy: Policy) -> list[InstructResult]:
        """Read each row's instruction; a missing or empty value becomes a status row."""
        results = []
        for row in rows:
            value = row.get(self.column)
            if value is None and self.column not in row:
                raise ValueError(f"column {self.column!r} not in the data; columns: {', '.join(row)}")
            if not isinstance(value, str) or not value.strip():
                results.append(InstructResult(None, None, repr(value), "missing_instruction",
                                              f"column {self.column!r} is empty"))
            else:
                results.append(InstructResult(value.strip(), None, value))
        return results


@dataclass(frozen=True)
class InstructConfig:
    """Settings of the instruct stage.

    Args:
        instructor: an ``instructors`` spec (``template``, ``column:<name>``, ``hf-vlm:<id or path>``).
        policy: a built-in policy name or a YAML path.
        device: ``auto`` (GPU of the rank when present) or a torch device string.
        batch_size: rows per call.
        num_proc: processes for ``Dataset.map`` (one per GPU).
        instructor_options: extra ``(key, value)`` options for the instructor backend
            (``hf-vlm``: dtype, trust_remote_code, revision, max_new_tokens).
    """

    instructor: str = "template"
    policy: str = "llavaguard"
    device: str = "auto"
    batch_size: int = 8
    num_proc: int | None = None
    instructor_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        parse_spec("instructors", self.instructor)
        load_policy(self.policy)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class InstructTransform:
    """Batched `Dataset.map` transform adding the instruct columns; holds only its config."""

    config: InstructConfig

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        from safetypairs.utils import device_for_rank

        policy = load_policy(self.config.policy)
        n = len(batch[S.IMAGE])
        results: list[InstructResult | None] = [None] * n
        todo, rows = [], []
        for i in range(n):
            row = {k: v[i] for k, v in batch.items()}
            problem = _check_row(row, policy)
            if problem:
                results[i] = problem
            else:
                todo.append(i)
                rows.append(row)
        if rows:
            backend = load_backend("instructors", self.config.instructor,
                                   device_for_rank(self.config.device, rank), **dict(self.config.instructor_options))
            for i, result in zip(todo, _instruct_isolated(backend, rows, policy)):
                results[i] = result
        out = dict(batch)
        out[S.POLICY] = [policy.id] * n
        out[S.INSTRUCTION] = [r.instruction for r in results]
        out[S.ELEMENT] = [r.element for r in results]
        out[S.INSTRUCTOR] = [self.config.instructor] * n
        out[S.INSTRUCT_RAW] = [r.raw for r in results]
        out[S.INSTRUCT_STATUS] = [r.status for r in results]
        out[S.INSTRUCT_ERROR] = [r.error for r in results]
        return out


def _check_row(row: dict[str, Any], policy: Policy) -> InstructResult | None:
    """A status result for a row that cannot be instructed (bad category or image), else None.

    On success the row's image cell is replaced by the decoded RGB image.
    """
    if row.get(S.CATEGORY) not in policy.categories:
        return InstructResult(None, None, "", "unknown_category",
                              f"row {row.get(S.SOURCE_ID)!r}: category {row.get(S.CATEGORY)!r} is not in policy "
                              f"{policy.id} (allowed: {', '.join(policy.categories)})")
    try:
        row[S.IMAGE] = load_image(row[S.IMAGE])
    except ImageError as err:
        return InstructResult(None, None, "", "unreadable", f"row {row.get(S.SOURCE_ID)!r}: {err}")
    return None


def _instruct_isolated(backend: Any, rows: list[dict[str, Any]], policy: Policy) -> list[InstructResult]:
    """Run the batch; if it fails (or answers for the wrong number of rows), run row by row so one
    bad row cannot sink the others."""
    try:
        results = backend.instruct(rows, policy)
        if len(results) == len(rows):
            return results
        logger.debug("instructor answered %d results for %d rows; retrying row by row", len(results), len(rows))
    except Exception:  # noqa: BLE001 - isolate the failing row below
        logger.debug("batch instruct failed; retrying row by row", exc_info=True)
    results = []
    for row in rows:
        try:
            (result,) = backend.instruct([row], policy)
            results.append(result)
        except Exception as err:  # noqa: BLE001 - a backend failure (or a wrong count) is a row status
            results.append(InstructResult(None, None, "", "error",
                                          f"row {row.get(S.SOURCE_ID)!r}: {type(err).__name__}: {err}"))
    return results


def run_instruct(dataset: Dataset, config: InstructConfig) -> tuple[Dataset, StageResult]:
    """Add ``instruction`` (and status columns) to every row.

    Args:
        dataset: source rows (`schema.SOURCE_FEATURES`).
        config: the stage settings.

    Returns:
        The dataset with `schema.INSTRUCT_FEATURES` added, and the stage summary.

    Raises:
        ValueError: when a ``column:<name>`` instructor names a column the data lacks.
    """
    spec = parse_spec("instructors", config.instructor)
    if spec.alias == "column" and spec.arg not in dataset.column_names:
        raise ValueError(f"column {spec.arg!r} not in the data; columns: {', '.join(dataset.column_names)}")
    features = S.with_columns(dataset.features, S.INSTRUCT_FEATURES)
    return map_stage(dataset, InstructTransform(config), stage="instruct", features=features,
                     status_column=S.INSTRUCT_STATUS, batch_size=config.batch_size, num_proc=config.num_proc)
