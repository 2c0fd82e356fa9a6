"""Edit stage: K candidate edits per source row (and an artifact control) from an image editor."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from PIL import Image

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    RUN_PNG_LEVEL,
    check_max_pixels,
    check_png_level,
    image_digest,
    load_image,
)
from safetypairs.instructions import noop_instruction
from safetypairs.backends.registry import (
    available,
    backend_class,
    check_ready,
    from_spec_arguments,
    load_backend,
    parse_spec,
)
from safetypairs.engine.stage import StageResult, isolate, map_stage
from safetypairs.utils import device_for_rank

logger = logging.getLogger(__name__)


def candidate_seed(base_seed: int, source_id: str, candidate: int) -> int:
    """A seed that depends only on the run seed, the source and the candidate index, so it is the
    same whatever the sharding, batch size or restart point."""
    digest = hashlib.sha256(f"{base_seed}:{source_id}:{candidate}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class EditConfig:
    """Settings of the edit stage.

    Args:
        editor: an ``editors`` spec (``ocr-inpaint``, ``diffusers:<id or path>``).
        candidates: edits per source row, each with its own recorded seed.
        control: also pass the original through the editor with a no-op instruction (the
            artifact control), once per source on candidate 0.
        seed: the run seed every candidate seed is derived from.
        device: ``auto`` (GPU of the rank when present) or a torch device string.
        batch_size: rows per call.
        num_proc: processes for ``Dataset.map`` (one per GPU).
        editor_options: extra ``(key, value)`` options for the editor backend (steps, guidance...).
        mask_column: a column of masks (white = edit) for editors that take masks (``takes_mask``,
            e.g. ``diffusers:`` with an inpainting pipeline); refused for any other editor.
        max_pixels: images with more pixels are decoded reduced (JPEG) or get status ``too_large``.
        png_level: zlib level (0-9) of the PNGs of the new images the stage stores (its run folder's edits and controls);
            the pixels are the same at every level, so it is not part of a run's fingerprint. Default
            `images.RUN_PNG_LEVEL` (1: 3-5x faster to write than 6 for ~13% more bytes).
    """

    editor: str = "ocr-inpaint"
    candidates: int = 1
    control: bool = False
    seed: int = 0
    device: str = "auto"
    batch_size: int = 4
    num_proc: int | None = None
    editor_options: tuple[tuple[str, Any], ...] = ()
    mask_column: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    png_level: int = RUN_PNG_LEVEL

    def __post_init__(self) -> None:
        check_png_level(self.png_level)
        check_ready("editors", self.editor, dict(self.editor_options))
        check_max_pixels(self.max_pixels)
        if self.mask_column is not None:
            _check_takes_mask(self.editor, self.mask_column)
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def editor_name(editor: str, options: tuple[tuple[str, Any], ...] = ()) -> str:
    """The ``editor`` column's value: the spec, with the set options its backend names as approximations
    (``APPROXIMATIONS``: a diffusers step cache, quantised weights) appended when only ``options`` gave them, so
    rows, the card and the evaluation name a run whose outputs they change.

    Example: ``diffusers:m`` with ``(("cache", "first_block"),)`` -> ``"diffusers:m,cache=first_block"``.
    """
    named = getattr(backend_class("editors", editor), "APPROXIMATIONS", ())
    given = {k for k, _ in options} & set(named)
    if not given:
        return editor
    values = from_spec_arguments("editors", editor, dict(options))[1]
    in_spec = parse_spec("editors", editor).options
    extra = [f"{k}={values[k]}" for k in named if k in given and values[k] is not None and in_spec.get(k) != values[k]]
    return ",".join([editor, *extra])


def _takes_mask(spec: str) -> bool:
    return bool(getattr(backend_class("editors", spec), "takes_mask", False))


def _check_takes_mask(editor: str, mask_column: str) -> None:
    """Refuse a mask column for an editor that takes no mask, naming the editors that do.

    Raises:
        ValueError: when ``editor`` does not declare ``takes_mask``.
    """
    if _takes_mask(editor):
        return
    takers = []
    for alias in available("editors"):
        try:
            if _takes_mask(alias):
                takers.append(alias)
        except (ImportError, AttributeError) as err:  # a broken third-party editor must not hide the answer
            logger.warning("editor %r cannot be imported: %s", alias, err)
    raise ValueError(f"editor {editor!r} takes no mask, so mask_column={mask_column!r} cannot be used; "
                     f"editors that take masks: {', '.join(takers) or 'none'}")


@dataclass
class _Job:
    row: int
    image: Image.Image
    instruction: str
    seed: int
    column: str  # EDITED_IMAGE or CONTROL_IMAGE
    mask: Image.Image | None = None


@dataclass(frozen=True)
class EditTransform:
    """Batched `Dataset.map` transform: each input row becomes ``candidates`` rows with
    ``edited_image`` (and ``control_image`` on candidate 0); holds only its config."""

    config: EditConfig

    def __call__(self, batch: dict[str, list], rank: int | None = None) -> dict[str, list]:
        k = self.config.candidates
        out: dict[str, list] = {key: [v for v in values for _ in range(k)] for key, values in batch.items()}
        n = len(out[S.IMAGE])
        out[S.EDITOR] = [editor_name(self.config.editor, self.config.editor_options)] * n
        out[S.CANDIDATE] = [i % k for i in range(n)]
        out[S.SEED] = [candidate_seed(self.config.seed, sid, c) for sid, c in zip(out[S.SOURCE_ID], out[S.CANDIDATE])]
        out[S.EDITED_IMAGE] = [None] * n
        out[S.CONTROL_IMAGE] = [None] * n
        out[S.EDIT_STATUS] = [ST.OK] * n
        out[S.EDIT_ERROR] = [None] * n
        out[S.EDIT_WORK_SIZE] = [None] * n
        jobs = self._jobs(out, n)
        if jobs:
            self._run(jobs, out, rank)
        if self.config.candidates > 1:
            _drop_duplicates(out, self.config.candidates)
        return out

    def _run(self, jobs: list[_Job], out: dict[str, list], rank: int | None) -> None:
        """Run the editor on every job and fill the image and status columns (in place)."""
        editor = load_backend("editors", self.config.editor, device_for_rank(self.config.device, rank),
                              **dict(self.config.editor_options))
        for job, (image, error) in zip(jobs, isolate(functools.partial(_edit, editor), jobs)):
            error = error or _check_size(job, image)
            if error is None:
                out[job.column][job.row] = image
                if job.column == S.EDITED_IMAGE:  # diffusers editors record the size they ran at
                    out[S.EDIT_WORK_SIZE][job.row] = image.info.get("work_size")
                continue
            main = job.column == S.EDITED_IMAGE  # a failed main edit is also the row's status (counted)
            logger.warning("%s failed for row %r (candidate %d): %s", "edit" if main else "control edit",
                           out[S.SOURCE_ID][job.row], out[S.CANDIDATE][job.row], error)
            if main:
                out[S.EDIT_STATUS][job.row] = ST.EDIT_ERROR
                out[S.EDIT_ERROR][job.row] = f"row {out[S.SOURCE_ID][job.row]!r}: {error}"

    def _jobs(self, out: dict[str, list], n: int) -> list[_Job]:
        """One job per candidate edit (and control); rows that cannot be edited get a status."""
        jobs = []
        statuses = out.get(S.INSTRUCT_STATUS) or [ST.OK] * n
        decoded: dict[int, tuple[Image.Image, Image.Image | None]] = {}  # the K candidates of a source share one decode
        for i in range(n):
            sid, status = out[S.SOURCE_ID][i], statuses[i]
            if status not in (ST.OK, None) or not out[S.INSTRUCTION][i]:
                out[S.EDIT_STATUS][i] = ST.NOT_INSTRUCTED
                out[S.EDIT_ERROR][i] = f"row {sid!r}: no instruction (instruct_status={status})"
                continue
            try:
                source = i // self.config.candidates
                if source not in decoded:
                    mask_cell = out[self.config.mask_column][i] if self.config.mask_column else None
                    cap = self.config.max_pixels
                    decoded[source] = (load_image(out[S.IMAGE][i], cap),
                                       load_image(mask_cell, cap).convert("L") if self.config.mask_column else None)
                image, mask = decoded[source]
            except ImageError as err:
                out[S.EDIT_STATUS][i], out[S.EDIT_ERROR][i] = err.status, f"row {sid!r}: {err}"
                continue
            jobs.append(_Job(i, image, out[S.INSTRUCTION][i], out[S.SEED][i], S.EDITED_IMAGE, mask))
            if self.config.control and out[S.CANDIDATE][i] == 0:
                jobs.append(_Job(i, image, noop_instruction(out[S.INSTRUCTION][i]), out[S.SEED][i], S.CONTROL_IMAGE,
                                 mask))
        return jobs


def _drop_duplicates(out: dict[str, list], k: int) -> None:
    """Mark candidates whose image equals an earlier candidate of the same source ``duplicate_candidate`` (in place).

    A deterministic editor (``ocr-inpaint``) ignores the seed, so K candidates would be K copies.
    """
    dropped = 0
    for start in range(0, len(out[S.IMAGE]), k):
        seen: dict[str, int] = {}
        for i in range(start, start + k):
            image = out[S.EDITED_IMAGE][i]
            if image is None or out[S.EDIT_STATUS][i] != ST.OK:
                continue
            digest = image_digest(image)
            if digest in seen:
                out[S.EDITED_IMAGE][i], out[S.EDIT_STATUS][i] = None, ST.DUPLICATE_CANDIDATE
                out[S.EDIT_ERROR][i] = (f"row {out[S.SOURCE_ID][i]!r}: candidate {out[S.CANDIDATE][i]} is identical to "
                                        f"candidate {out[S.CANDIDATE][seen[digest]]}")
                dropped += 1
            else:
                seen[digest] = i
    if dropped:
        logger.warning("edit: dropped %d candidate(s) identical to an earlier candidate of the same source (the "
                       "editor ignores the seed); --candidates 1 gives the same pairs for less work", dropped)


def _check_size(job: _Job, image: Image.Image) -> str | None:
    if image.size != job.image.size:
        return f"editor returned {image.size[0]}x{image.size[1]} for a {job.image.size[0]}x{job.image.size[1]} source"
    return None


def _masks(jobs: list[_Job]) -> dict[str, Any]:
    """``masks=`` for mask-guided editors; nothing when the stage has no mask column."""
    return {"masks": [j.mask for j in jobs]} if any(j.mask is not None for j in jobs) else {}


def _edit(editor: Any, jobs: list[_Job]) -> list[Image.Image]:
    """One editor call for ``jobs`` (run through `isolate`: a batch that runs out of memory is run in halves, and a
    bad row, or one sample too large on its own, becomes that row's error instead of sinking the batch)."""
    return editor.edit([j.image for j in jobs], [j.instruction for j in jobs], [j.seed for j in jobs], **_masks(jobs))


def run_edit(dataset: Dataset, config: EditConfig) -> tuple[Dataset, StageResult]:
    """Edit every instructed row ``config.candidates`` times.

    Args:
        dataset: rows with ``image`` and ``instruction`` (the instruct stage's output).
        config: the stage settings.

    Returns:
        The candidate rows (`schema.EDIT_FEATURES` added; rows out = rows in x candidates) and
        the stage summary.

    Raises:
        ValueError: when ``config.mask_column`` is not a column of the data.
    """
    if config.mask_column and config.mask_column not in dataset.column_names:
        raise ValueError(f"mask column {config.mask_column!r} not in the data; "
                         f"columns: {', '.join(dataset.column_names)}")
    features = S.with_columns(dataset.features, S.EDIT_FEATURES)
    return map_stage(dataset, EditTransform(config), stage="edit", features=features, status_column=S.EDIT_STATUS,
                     batch_size=config.batch_size, num_proc=config.num_proc, rows_per_input=config.candidates,
                     png_level=config.png_level)
