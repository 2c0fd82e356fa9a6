"""Every status and reason a row can carry, each with its meaning: the one vocabulary of the house.

A row keeps one status per stage (``instruct_status``, ``edit_status``, ``validate_status``, a guard's status,
``embed_status``) and one final fate (``reject_reason``: ``None`` for a released pair). A row that stops at a
stage carries that stage's status as its fate, word for word, so the funnel, the card, the validate summary and
the report name it alike. The README's status table is generated from `VOCABULARY` (`markdown_table`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Status:
    """One word of the vocabulary: its name, the stages that set it, and what it means."""

    name: str
    stages: tuple[str, ...]
    meaning: str


VOCABULARY: dict[str, Status] = {}


def _define(name: str, stages: str, meaning: str) -> str:
    VOCABULARY[name] = Status(name, tuple(stages.split()), meaning)
    return name


# --- every stage ------------------------------------------------------------------------------------------------
OK = _define("ok", "source instruct edit validate evaluate embed", "the stage did its work on the row")
UNREADABLE = _define("unreadable", "source instruct edit validate evaluate embed",
                     "an image cell could not be decoded (the error names the row; the cell is stored as null)")
TOO_LARGE = _define("too_large", "source instruct edit validate evaluate embed",
                    "an image has more pixels than max_pixels and cannot be decoded reduced")

# --- instruct ---------------------------------------------------------------------------------------------------
NOT_UNSAFE = _define("not_unsafe", "instruct",
                     "the source row is labelled safe: set aside as a natural negative, never edited (not a failure)")
UNKNOWN_CATEGORY = _define("unknown_category", "instruct validate",
                           "the category is null, blank or not one of the policy's categories")
NO_VIOLATION_FOUND = _define("no_violation_found", "instruct",
                             "the template instructor found no lexicon word in the image's text")
MISSING_INSTRUCTION = _define("missing_instruction", "instruct", "the given instruction column is empty for the row")
UNPARSABLE = _define("unparsable", "instruct evaluate",
                     "a model's answer could not be parsed (an instruction, or a guard's label)")
INSTRUCT_ERROR = _define("instruct_error", "instruct", "the instructor raised on the row (the error names it)")
API_ERROR = _define("api_error", "instruct validate evaluate",
                    "a served model's request failed after every retry (the error names the cause); a rerun asks "
                    "again for these rows only: every other answer is in the response cache")

# --- edit -------------------------------------------------------------------------------------------------------
NOT_INSTRUCTED = _define("not_instructed", "edit", "no instruction to carry out: see the row's instruct_status")
EDIT_ERROR = _define("edit_error", "edit",
                     "the editor raised on the row or could not carry out the instruction (the error says why)")
DUPLICATE_CANDIDATE = _define("duplicate_candidate", "edit",
                              "the editor returned the same image as an earlier candidate of this source")

# --- validate ---------------------------------------------------------------------------------------------------
NOT_EDITED = _define("not_edited", "validate", "the edit stage stopped the row: see its edit_status")
SIZE_MISMATCH = _define("size_mismatch", "validate", "the two images differ in size and size_mismatch='reject'")
TOO_SMALL = _define("too_small", "validate", "an image side is below min_side (smaller than the LPIPS receptive field)")
JUDGE_ERROR = _define("judge_error", "validate", "the judge raised on the row; its pixel metrics are kept")
NOT_LOCAL = _define("not_local", "validate",
                    "changed_fraction or change_spread above its limit: the change covers too much of the image")
BACKGROUND_CHANGED = _define("background_changed", "validate",
                             "SSIM/PSNR (or LPIPS/CLIP, when limits are set) outside the dilated mask past their limit")
NO_CHANGE = _define("no_change", "validate",
                    "no connected change reaches min_element_fraction: the edit is indistinguishable from its reference")
JUDGE_UNKNOWN = _define("judge_unknown", "validate", "the judge could not label one of the images")
ORIGINAL_NOT_UNSAFE = _define("original_not_unsafe", "validate", "the judge does not call the original unsafe")
STILL_UNSAFE = _define("still_unsafe", "validate", "the judge still calls the edited image unsafe")
ACCEPTED = _define("accepted", "validate",
                   "measured, within every limit and (with a judge) label-flipping: a candidate pair (no reject_reason)")

# --- review and release -----------------------------------------------------------------------------------------
HUMAN_REJECTED = _define("human_rejected", "release",
                         "reviewers rejected the pair; written human_rejected:<reason> (the majority's reason, or "
                         "no_majority)")
NOT_REVIEWED = _define("not_reviewed", "release", "release --require-review and too few reviewers decided on the pair")
NOT_SELECTED = _define("not_selected", "release", "another accepted candidate of this source was better preserved")
DUPLICATE_PAIR = _define("duplicate_pair", "release", "another source gave a pair with the same images (same pair_id)")
NO_REASON = _define("no_reason", "release", "the validated input marks the row not accepted and names no reason")

# --- evaluate and score -----------------------------------------------------------------------------------------
GUARD_ERROR = _define("guard_error", "evaluate", "the guard raised on the image; its prediction is unknown (an error)")
MISSING = _define("missing", "evaluate", "score: the predictions file has no row for the image (counted as an error)")

# --- comparisons of training with eval data (left out, counted) ------------------------------------------------
SAME_IMAGE = _define("same_image", "compare", "the eval image is a training or release image (equal pixel digest)")
SAME_SOURCE = _define("same_source", "compare",
                      "the eval image's source holds a training or release image (e.g. the edit of a training original)")
SAME_SOURCE_ID = _define("same_source_id", "compare",
                         "no digest to compare: the eval row's source id is a training row's source id")
OUTSIDE_POLICY = _define("outside_policy", "compare", "the natural row's category is not one of the policy's")

# A row that stops at instruct or edit carries that status as its fate (reject_reason); these never pass on.
STOPS = {name for name, s in VOCABULARY.items()
         if name not in (OK, ACCEPTED) and set(s.stages) & {"instruct", "edit", "validate"}}
# Where validation decides on a measured row (the rest are row failures: the row could not be measured).
DECISIONS = (NOT_LOCAL, BACKGROUND_CHANGED, NO_CHANGE, JUDGE_UNKNOWN, ORIGINAL_NOT_UNSAFE, STILL_UNSAFE)


def human_rejected(reason: str) -> str:
    """The fate of a pair reviewers rejected: ``human_rejected:<reason>``."""
    return f"{HUMAN_REJECTED}:{reason}"


def is_known(value: str | None) -> bool:
    """Whether a status or reason value belongs to the vocabulary (``None`` = accepted / no status)."""
    if value is None:
        return True
    name, _, detail = value.partition(":")
    return name in VOCABULARY and (not detail or name == HUMAN_REJECTED)


def meaning(value: str | None) -> str:
    """The meaning of a status or reason (``human_rejected:<reason>`` included); ``""`` when unknown."""
    name = (value or "").partition(":")[0]
    return VOCABULARY[name].meaning if name in VOCABULARY else ""


def markdown_table() -> str:
    """The README's status table: every status, the stages that set it, and its meaning."""
    lines = ["| status | set by | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{s.name}` | {', '.join(s.stages)} | {s.meaning} |" for s in VOCABULARY.values()]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m safetypairs.statuses: the README's status table
    print(markdown_table())
