"""Column names and `datasets.Features`: the only interface between pipeline stages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from datasets import ClassLabel, Features, Image, List, Sequence, Value

# --- source stage -----------------------------------------------------------------------------
SOURCE_ID = "source_id"
IMAGE = "image"
CATEGORY = "category"
RATIONALE = "rationale"
POLICY = "policy"
SOURCE_META = "source_meta"  # JSON string: how the source was made (demo: rendered text and box)
SOURCE_LABEL = "source_label"  # "unsafe", "safe" (set aside: status not_unsafe) or "" when the source has no label
SOURCE_STATUS = "source_status"  # "ok" or why the row could not be read
SOURCE_ERROR = "source_error"

# --- instruct stage ---------------------------------------------------------------------------
INSTRUCTION = "instruction"
ELEMENT = "element"  # the violating element the instruction targets
INSTRUCTOR = "instructor"
INSTRUCT_RAW = "instruct_raw"
INSTRUCT_STATUS = "instruct_status"
INSTRUCT_ERROR = "instruct_error"

# --- edit stage -------------------------------------------------------------------------------
EDITED_IMAGE = "edited_image"
CONTROL_IMAGE = "control_image"  # the original through the same editor with a no-op instruction
EDITOR = "editor"
SEED = "seed"
CANDIDATE = "candidate"
EDIT_STATUS = "edit_status"
EDIT_ERROR = "edit_error"
EDIT_WORK_SIZE = "edit_work_size"  # [w, h] the editor ran at (its output is resized back to the source size)

# --- validate stage ---------------------------------------------------------------------------
EDIT_MASK = "edit_mask"
CHANGED_FRACTION = "changed_fraction"
CHANGE_BBOX = "change_bbox"  # [x0, y0, x1, y1] of the change mask, empty when nothing changed
CHANGE_SPREAD = "change_spread"  # share of 8x8 grid cells the change touches (locality)
LPIPS_OUTSIDE = "lpips_outside"
LPIPS_INSIDE = "lpips_inside"
SSIM_OUTSIDE = "ssim_outside"
PSNR_OUTSIDE = "psnr_outside"
CLIP_OUTSIDE = "clip_outside"
COLOR_CHANGE_INSIDE = "color_change_inside"
CHANGE_ELEMENT = "change_element_fraction"  # share of the image the largest connected change covers (no_change test)
VALIDATE_REFERENCE = "validate_reference"  # what the edit was compared with: original | control | vae_roundtrip
NOISE_FLOOR_PSNR = "noise_floor_psnr"  # PSNR (dB) of the reference vs the original: the editor's own fingerprint
VALIDATE_THRESHOLDS = "validate_thresholds"  # the threshold preset or file the row was decided with
VALIDATE_LIMITS = "validate_limits"  # JSON: the threshold values the row was decided with (review reads them)
METRICS_RAN = "metrics_ran"
JUDGE = "judge"
JUDGE_ORIGINAL = "judge_original"
JUDGE_EDITED = "judge_edited"
JUDGE_ORIGINAL_RAW = "judge_original_raw"
JUDGE_EDITED_RAW = "judge_edited_raw"
ACCEPTED = "accepted"
LABEL_FLIP_CHECKED = "label_flip_checked"  # a judge checked that the original is unsafe and the edit safe
VALIDATE_STATUS = "validate_status"
VALIDATE_ERROR = "validate_error"  # detail for a row that could not be measured
VALIDATE_RESIZED = "validate_resized"  # the edited image was resized to the original's size
REJECT_REASON = "reject_reason"  # the row's fate: a word of `statuses` (None = accepted / released)
REJECT_DETAIL = "reject_detail"  # the numbers behind a validation decision: "psnr_outside 29.1 < 32.5"

# --- release: pairs and images configs --------------------------------------------------------
PAIR_ID = "pair_id"
UNSAFE_IMAGE = "unsafe_image"
SAFE_IMAGE = "safe_image"
LABEL = "label"
ROLE = "role"
IMAGE_ID = "image_id"  # "<pair_id>-<role>": one image of the images config (predictions files key on it)
IMAGE_DIGEST = "image_digest"  # pixel digest of the image (`images.image_digest`): its identity across datasets
HUMAN_VERIFIED = "human_verified"  # a majority of reviewers accepted the pair (`safetypairs review`)
N_REVIEWERS = "n_reviewers"  # reviewers who decided on it (0 when the release was not reviewed)

# --- embed stage ------------------------------------------------------------------------------
EMBEDDING = "embedding"
EMBED_STATUS = "embed_status"
EMBED_ERROR = "embed_error"

# --- run folders ------------------------------------------------------------------------------
IMAGE_CHECKS = "image_checks"  # the run writer's record of each image cell it checked (`engine.imagechecks`)

LABELS = ["safe", "unsafe"]
SAFE, UNSAFE, UNKNOWN = "safe", "unsafe", "unknown"
ROLES = ("original", "edited", "control")

SOURCE_FEATURES = Features(
    {
        SOURCE_ID: Value("string"),
        IMAGE: Image(),
        CATEGORY: Value("string"),
        RATIONALE: Value("string"),
        SOURCE_META: Value("string"),
        SOURCE_LABEL: Value("string"),
    }
)

PAIR_FEATURES = Features(
    {
        PAIR_ID: Value("string"),
        CATEGORY: Value("string"),
        POLICY: Value("string"),
        UNSAFE_IMAGE: Image(),
        SAFE_IMAGE: Image(),
        CONTROL_IMAGE: Image(),
        INSTRUCTION: Value("string"),
        ELEMENT: Value("string"),
        SOURCE_ID: Value("string"),
        RATIONALE: Value("string"),
        SOURCE_META: Value("string"),
        INSTRUCTOR: Value("string"),
        EDITOR: Value("string"),
        SEED: Value("int64"),
        EDIT_MASK: Image(),
        CHANGED_FRACTION: Value("float32"),
        LPIPS_OUTSIDE: Value("float32"),
        SSIM_OUTSIDE: Value("float32"),
        PSNR_OUTSIDE: Value("float32"),
        CLIP_OUTSIDE: Value("float32"),
        JUDGE: Value("string"),
        LABEL_FLIP_CHECKED: Value("bool"),
        HUMAN_VERIFIED: Value("bool"),
        N_REVIEWERS: Value("int32"),
    }
)

IMAGE_FEATURES = Features(
    {
        IMAGE: Image(),
        LABEL: ClassLabel(names=LABELS),
        CATEGORY: Value("string"),
        PAIR_ID: Value("string"),
        ROLE: ClassLabel(names=list(ROLES)),
        IMAGE_ID: Value("string"),
        SOURCE_ID: Value("string"),
        IMAGE_DIGEST: Value("string"),
    }
)

INSTRUCT_FEATURES = Features(
    {
        POLICY: Value("string"),
        INSTRUCTION: Value("string"),
        ELEMENT: Value("string"),
        INSTRUCTOR: Value("string"),
        INSTRUCT_RAW: Value("string"),
        INSTRUCT_STATUS: Value("string"),
        INSTRUCT_ERROR: Value("string"),
    }
)

EDIT_FEATURES = Features(
    {
        EDITED_IMAGE: Image(),
        CONTROL_IMAGE: Image(),
        EDITOR: Value("string"),
        SEED: Value("int64"),
        CANDIDATE: Value("int32"),
        EDIT_STATUS: Value("string"),
        EDIT_ERROR: Value("string"),
        EDIT_WORK_SIZE: Sequence(Value("int32")),
    }
)

VALIDATION_FEATURES = Features(
    {
        EDIT_MASK: Image(),
        CHANGED_FRACTION: Value("float32"),
        CHANGE_BBOX: Sequence(Value("int32")),
        CHANGE_SPREAD: Value("float32"),
        LPIPS_OUTSIDE: Value("float32"),
        LPIPS_INSIDE: Value("float32"),
        SSIM_OUTSIDE: Value("float32"),
        PSNR_OUTSIDE: Value("float32"),
        CLIP_OUTSIDE: Value("float32"),
        COLOR_CHANGE_INSIDE: Value("float32"),
        CHANGE_ELEMENT: Value("float32"),
        VALIDATE_REFERENCE: Value("string"),
        NOISE_FLOOR_PSNR: Value("float32"),
        VALIDATE_THRESHOLDS: Value("string"),
        VALIDATE_LIMITS: Value("string"),
        METRICS_RAN: Sequence(Value("string")),
        JUDGE: Value("string"),
        JUDGE_ORIGINAL: Value("string"),
        JUDGE_EDITED: Value("string"),
        JUDGE_ORIGINAL_RAW: Value("string"),
        JUDGE_EDITED_RAW: Value("string"),
        ACCEPTED: Value("bool"),
        LABEL_FLIP_CHECKED: Value("bool"),
        VALIDATE_STATUS: Value("string"),
        VALIDATE_ERROR: Value("string"),
        VALIDATE_RESIZED: Value("bool"),
        REJECT_REASON: Value("string"),
        REJECT_DETAIL: Value("string"),
    }
)

EMBED_FEATURES = Features(
    {
        EMBEDDING: Sequence(Value("float32")),
        IMAGE_DIGEST: Value("string"),
        EMBED_STATUS: Value("string"),
        EMBED_ERROR: Value("string"),
    }
)

# one record per image cell of the row: digest of the stored bytes, pixel digest and pixel count (`ImageCheck`)
IMAGE_CHECKS_FEATURES = Features(
    {IMAGE_CHECKS: List({"sha256": Value("string"), "digest": Value("string"), "pixels": Value("int64")})}
)


def role_names(values: Iterable[Any]) -> list[str]:
    """Role names from a ``role`` column: ints (the images config's ClassLabel) become `ROLES` names, strings stay.

    Raises:
        ValueError: for an int outside `ROLES`.
    """
    out = []
    for value in values:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not 0 <= value < len(ROLES):
                raise ValueError(f"role {value} is not a role index; allowed: {', '.join(f'{i} ({r})' for i, r in enumerate(ROLES))}")
            value = ROLES[int(value)]
        out.append("" if value is None else str(value))
    return out


def image_id(pair: str, role: str) -> str:
    """The id of one image of the images config: ``"<pair_id>-<role>"``."""
    return f"{pair}-{role}"


def with_columns(features: Features, extra: Features) -> Features:
    """Return `features` extended (or overridden) by `extra`, keeping the order of both.

    Args:
        features: the dataset's current features.
        extra: the columns a stage adds.

    Returns:
        A new `Features` object.
    """
    merged = dict(features)
    merged.update(extra)
    return Features(merged)
