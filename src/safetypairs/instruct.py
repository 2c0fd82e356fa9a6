"""Instruct stage: write a policy-aware edit instruction for each source row."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.backends.base import InstructResult
from safetypairs.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageTooLargeError,
    check_max_pixels,
    load_image,
)
from safetypairs.policy import Policy, is_none_category, load_policy
from safetypairs.backends.registry import check_ready, load_backend, parse_spec
from safetypairs.engine.stage import StageResult, isolate, map_stage

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class InstructConfig:
    """Settings of the instruct stage.

    Args:
        instructor: an ``instructors`` spec (``template``, ``column:<name>``, ``hf-vlm:<id or path>``).
        policy: a built-in policy name, a YAML path or a `Policy`.
        device: ``auto`` (GPU of the rank when present) or a torch device string.
        batch_size: rows per call.
        num_proc: processes for ``Dataset.map`` (one per GPU).
        instructor_options: extra ``(key, value)`` options for the instructor backend
            (``hf-vlm``: dtype, trust_remote_code, revision, max_new_tokens).
        max_pixels: images with more pixels are decoded reduced (JPEG) or get status ``too_large``.
    """

    instructor: str = "template"
    policy: str | Policy = "llavaguard"
    device: str = "auto"
    batch_size: int = 8
    num_proc: int | None = None
    instructor_options: tuple[tuple[str, Any], ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_ready("instructors", self.instructor, dict(self.instructor_options))  # loads no model
        check_max_pixels(self.max_pixels)
        load_policy(self.policy)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class InstructTransform:
    """Batched `Dataset.map` transform adding the instruct columns; holds only its config."""

    config: InstructConfig

    @functools.cached_property
    def policy(self) -> Policy:
        """The stage's policy, loaded once per transform (and per process)."""
        return load_policy(self.config.policy)

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        from safetypairs.utils import device_for_rank

        policy = self.policy
        n = len(batch[S.IMAGE])
        out_images = list(batch[S.IMAGE])
        results: list[InstructResult | None] = [None] * n
        todo, rows = [], []
        for i in range(n):
            row = {k: v[i] for k, v in batch.items()}
            problem = _check_row(row, policy, self.config.max_pixels)
            if problem:
                results[i] = problem
                if problem.status in (ImageError.status, ImageTooLargeError.status):
                    out_images[i] = None  # the unreadable bytes are not carried on
            else:
                todo.append(i)
                rows.append(row)
        if rows:
            backend = load_backend("instructors", self.config.instructor,
                                   device_for_rank(self.config.device, rank), **dict(self.config.instructor_options))
            answers = isolate(lambda some: backend.instruct(some, policy), rows)
            for i, row, (result, error) in zip(todo, rows, answers):
                results[i] = result if error is None else InstructResult(
                    None, None, "", ST.INSTRUCT_ERROR, f"row {row.get(S.SOURCE_ID)!r}: {error}")
        out = dict(batch)
        out[S.IMAGE] = out_images
        if S.CATEGORY in batch:  # resolved codes ("O1: Hate, ..." -> "O1") for the rows that were instructed
            out[S.CATEGORY] = list(batch[S.CATEGORY])
            for i, row in zip(todo, rows):
                out[S.CATEGORY][i] = row[S.CATEGORY]
        out[S.POLICY] = [policy.id] * n
        out[S.INSTRUCTION] = [r.instruction for r in results]
        out[S.ELEMENT] = [r.element for r in results]
        out[S.INSTRUCTOR] = [self.config.instructor] * n
        out[S.INSTRUCT_RAW] = [r.raw for r in results]
        out[S.INSTRUCT_STATUS] = [r.status for r in results]
        out[S.INSTRUCT_ERROR] = [r.error for r in results]
        return out


def row_status(category: Any, label: Any, policy: Policy) -> tuple[str, str | None]:
    """How a source row enters the instruct stage, from its category and label alone (no image read).

    Returns:
        ``("ok", code)`` with the resolved category code (see `Policy.resolve`),
        ``("not_unsafe", None)`` for a row labelled safe (``source_label`` safe or an ``NA`` category),
        or ``("unknown_category", None)``.
    """
    if label == S.SAFE or (label != S.UNSAFE and is_none_category(category)):
        return ST.NOT_UNSAFE, None
    code = policy.resolve(category)
    return (ST.OK, code) if code is not None else (ST.UNKNOWN_CATEGORY, None)


def status_error(status: str, category: Any, policy: Policy) -> str:
    """The text of a `row_status` failure (without the row id)."""
    if status == ST.NOT_UNSAFE:
        return f"labelled safe in the source (category {category!r}): set aside as a natural negative"
    return (f"category {category!r} is not in policy {policy.id} (allowed: {', '.join(policy.categories)}, "
            "'<code>: <name>', the names or a category's aliases)")


def _check_row(row: dict[str, Any], policy: Policy, max_pixels: int) -> InstructResult | None:
    """A status result for a row that cannot be instructed (safe, bad category or image), else None.

    On success the row's category becomes its code and its image cell the decoded RGB image.
    """
    status, code = row_status(row.get(S.CATEGORY), row.get(S.SOURCE_LABEL), policy)
    if code is None:
        return InstructResult(None, None, "", status,
                              f"row {row.get(S.SOURCE_ID)!r}: {status_error(status, row.get(S.CATEGORY), policy)}")
    row[S.CATEGORY] = code
    try:
        row[S.IMAGE] = load_image(row[S.IMAGE], max_pixels)
    except ImageError as err:
        return InstructResult(None, None, "", err.status, f"row {row.get(S.SOURCE_ID)!r}: {err}")
    return None


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
