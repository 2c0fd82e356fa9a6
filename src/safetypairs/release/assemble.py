"""Benchmark release: validated candidates -> `pairs` / `images` / `rejected` configs in the hub layout."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict, Features, Sequence, Value
from datasets.utils.py_utils import convert_file_size_to_int

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.engine.datafiles import ROW_GROUP_SIZE
from safetypairs.engine.imagechecks import ImageCheck, as_rgb_png, pixel_digest, recorded
from safetypairs.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_max_pixels,
    image_digest,
    load_image,
)
from safetypairs.engine.stage import empty_dataset, undecoded
from safetypairs.utils import progress

if TYPE_CHECKING:
    from safetypairs.review.store import ReviewResult

logger = logging.getLogger(__name__)

CONFIGS = ("pairs", "images", "rejected")
DEFAULT_CONFIG = "pairs"
SPLIT_BY = (None, "source")

REJECTED_FEATURES = S.with_columns(
    S.PAIR_FEATURES,
    Features(
        {
            S.CANDIDATE: Value("int32"),
            S.ACCEPTED: Value("bool"),
            S.EDIT_STATUS: Value("string"),
            S.EDIT_ERROR: Value("string"),
            S.VALIDATE_STATUS: Value("string"),
            S.VALIDATE_ERROR: Value("string"),
            S.REJECT_REASON: Value("string"),
            S.REJECT_DETAIL: Value("string"),
        }
    ),
)
FEATURES = {"pairs": S.PAIR_FEATURES, "images": S.IMAGE_FEATURES, "rejected": REJECTED_FEATURES}
REQUIRED_COLUMNS = (S.SOURCE_ID, S.IMAGE, S.EDITED_IMAGE, S.CATEGORY, S.ACCEPTED)
_SELECT_COLUMNS = (S.SOURCE_ID, S.ACCEPTED, S.CANDIDATE, S.LPIPS_OUTSIDE, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE)
_ROW = "__row__"
_PAIR = "__pair_id__"  # each row's content pair id, computed once before the configs are built
_UNREADABLE = "__unreadable__"  # the row's image columns that cannot be read (written as null)
_DIGESTS = "__digests__"  # the row's [original, edited] pixel digests, computed once with the pair id
_RENAMED = {S.UNSAFE_IMAGE: S.IMAGE, S.SAFE_IMAGE: S.EDITED_IMAGE}  # release column -> validated column
_PAIR_IMAGES = (S.UNSAFE_IMAGE, S.SAFE_IMAGE, S.CONTROL_IMAGE)  # stored alike, as RGB PNG (the mask stays as it is)
_DEFAULTS = {S.HUMAN_VERIFIED: False, S.N_REVIEWERS: 0}  # release column -> value when the input lacks it


@dataclass(frozen=True)
class ReleaseConfig:
    """How to assemble and write a release.

    Attributes:
        split_by: ``None`` puts every pair in ``test``; ``"source"`` makes a train/test split grouped
            by source image (no source on both sides) and stratified by category.
        test_size: share of source groups per category that go to ``test`` when splitting.
        seed: seed of the split (a hash order, so the split is stable across runs).
        include_rejected: also write the ``rejected`` config (every candidate not released, with reasons).
        max_shard_size: largest parquet shard, as bytes or a string like ``"500MB"``.
        license: the card's license id (a Hub license identifier).
        pretty_name: the card's title.
        n_examples: pairs shown in the card's example grid.
        max_pixels: images with more pixels are decoded reduced (JPEG) or, in an accepted candidate, get it
            rejected as ``too_large``; a written image cell that does not decode within it is stored as null.
    """

    split_by: str | None = None
    test_size: float = 0.5
    seed: int = 0
    include_rejected: bool = True
    max_shard_size: int | str = "500MB"
    license: str = "cc-by-nc-4.0"
    pretty_name: str = "SafetyPairs"
    n_examples: int = 6
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size!r}")
        if convert_file_size_to_int(self.max_shard_size) <= 0:
            raise ValueError(f"max_shard_size must be positive, got {self.max_shard_size!r}")
        if not self.license or not self.pretty_name:
            raise ValueError("license and pretty_name must be non-empty")
        for name, value in (("license", self.license), ("pretty_name", self.pretty_name)):
            if any(ch in value for ch in "\r\n") or value.strip() != value:
                raise ValueError(f"{name} must be one line without surrounding spaces, got {value!r}")
        if self.n_examples < 0:
            raise ValueError(f"n_examples must be >= 0, got {self.n_examples}")


@dataclass
class Release:
    """An assembled release: one `DatasetDict` per config, plus the acceptance funnel.

    Attributes:
        configs: config name (``pairs``, ``images``, optionally ``rejected``) -> splits.
        funnel: the release funnel, a list of ``{stage, rows_in, rows_out, statuses}`` dicts.
        review: the human review's protocol and agreement (`review.ReviewResult.summary`), if reviewed.
        composited: released pairs whose edit validation composited onto the original (``validate
            --composite``: outside the feathered change mask the safe image is the original's pixels).
        checked: the records of image cells a run checked upstream (the rows' ``image_checks``), by bytes
            digest: the release's pixel digests and its writes reuse them instead of decoding again.
    """

    configs: dict[str, DatasetDict]
    funnel: list[dict[str, Any]] = field(default_factory=list)
    review: dict[str, Any] | None = None
    composited: int = 0
    checked: dict[str, ImageCheck] = field(default_factory=dict)

    def __getitem__(self, config: str) -> DatasetDict:
        return self.configs[config]


def pair_id(policy: str | None, category: str | None, original: Any, edited: Any,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """A stable content id of a pair: same images, category and policy give the same id.

    Args:
        policy: the policy id (``name@version``).
        category: the category code.
        original: the unsafe image cell (any form `images.load_image` reads).
        edited: the safe (edited) image cell.
        max_pixels: the pixel cap of `images.load_image`.

    Returns:
        ``"sp-"`` followed by 16 hex characters of a SHA-256 over the pixel digests.

    Raises:
        ImageError: when an image cannot be read within ``max_pixels``.
    """
    return _content_id(policy, category, image_digest(load_image(original, max_pixels)),
                       image_digest(load_image(edited, max_pixels)))


def _content_id(policy: str | None, category: str | None, original_digest: str, edited_digest: str) -> str:
    parts = [policy or "", category or "", original_digest, edited_digest]
    return "sp-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def best_candidates(validated: Dataset) -> list[int]:
    """Row indices of the released candidates: `validate.decision.select_best` (per source, the best-preserved accepted one).

    Only non-image columns are read.

    Args:
        validated: validated candidate rows.

    Returns:
        Sorted row indices, at most one per source.
    """
    from safetypairs.validate.decision import select_best

    cols = [c for c in _SELECT_COLUMNS if c in validated.column_names]
    keyed = validated.select_columns(cols).add_column(_ROW, list(range(len(validated))))
    return sorted(select_best(keyed)[_ROW])


def split_by_source(source_ids: list[str], categories: list[str], config: ReleaseConfig) -> dict[str, list[int]]:
    """Assign rows to splits: ``test`` only, or train/test grouped by source and stratified by category.

    Args:
        source_ids: each row's source id (rows of one source always share a split).
        categories: each row's category (a source's first row decides its stratum).
        config: ``split_by``, ``test_size`` and ``seed``.

    Returns:
        Split name -> sorted row indices (``test`` first).
    """
    if config.split_by is None or not source_ids:
        return {"test": list(range(len(source_ids)))}
    strata: dict[str, list[str]] = defaultdict(list)
    for src, cat in dict(zip(reversed(source_ids), reversed(categories))).items():
        strata[cat].append(src)
    test_sources: set[str] = set()
    for cat in sorted(strata, key=str):  # str: a null category sorts too
        groups = sorted(strata[cat], key=lambda s: hashlib.sha256(f"{config.seed}|{s}".encode()).hexdigest())
        n_test = round(len(groups) * config.test_size)
        if len(groups) >= 2:
            n_test = min(max(n_test, 1), len(groups) - 1)
        test_sources.update(groups[:n_test])
    splits: dict[str, list[int]] = {"test": [], "train": []}
    for i, src in enumerate(source_ids):
        splits["test" if src in test_sources else "train"].append(i)
    return {name: rows for name, rows in splits.items() if rows}


def _release_batch(batch: dict[str, list], features: Features, max_pixels: int) -> dict[str, list]:
    """Validated rows -> rows of ``features`` (pairs or rejected), with a content pair id, null cells where an
    image cannot be read, every image stored alike (`imagechecks.as_rgb_png`: originals in any source format
    become RGB PNGs of their first frame, like the edits) and the records of re-encoded cells in ``image_checks``."""
    n = len(batch[S.SOURCE_ID])
    out: dict[str, list] = {S.IMAGE_CHECKS: [[] for _ in range(n)]}
    for name in features:
        if name == S.PAIR_ID:
            continue
        src = _RENAMED.get(name, name)
        out[name] = batch[src] if src in batch else [_DEFAULTS.get(name)] * n
        out[name] = [None if src in bad else v for v, bad in zip(out[name], batch[_UNREADABLE])]
        if name in _PAIR_IMAGES:
            for i, (cell, record) in enumerate(as_rgb_png(cell, max_pixels) for cell in out[name]):
                out[name][i] = cell
                if record is not None:
                    out[S.IMAGE_CHECKS][i].append(record._asdict())
    out[S.PAIR_ID] = batch[_PAIR]
    if S.REJECT_REASON in features:
        out[S.REJECT_REASON] = [
            reason or (ST.NOT_SELECTED if ok else ST.NO_REASON) for reason, ok in zip(out[S.REJECT_REASON], out[S.ACCEPTED])
        ]
    return {name: out[name] for name in (*features, S.IMAGE_CHECKS)}


def _released(rows: Dataset, features: Features, desc: str, max_pixels: int,
              checked: dict[str, ImageCheck]) -> Dataset:
    """``rows`` mapped by `_release_batch` into ``features``; the records of the cells it re-encoded are added to
    ``checked`` (the release's writes then decode nothing again) and their column dropped."""
    out = _map(rows, _release_batch, S.with_columns(features, S.IMAGE_CHECKS_FEATURES), desc,
               fn_kwargs={"features": features, "max_pixels": max_pixels})
    checked.update(recorded(out[S.IMAGE_CHECKS]))
    return out.remove_columns([S.IMAGE_CHECKS])


def _images_batch(batch: dict[str, list], digests: dict[str, list[str]], max_pixels: int,
                  checked: dict[str, ImageCheck]) -> dict[str, list]:
    """Pairs -> one row per image: original (unsafe), edited (safe) and control (unsafe) when present, each
    with its pair's source id and its own pixel digest (``digests``: pair id -> [original, edited]; the
    control's from ``checked`` when recorded upstream)."""
    out: dict[str, list] = {name: [] for name in S.IMAGE_FEATURES}
    unsafe, safe = S.LABELS.index(S.UNSAFE), S.LABELS.index(S.SAFE)
    for i, pid in enumerate(batch[S.PAIR_ID]):
        roles = [(batch[S.UNSAFE_IMAGE][i], unsafe, "original", digests[pid][0]),
                 (batch[S.SAFE_IMAGE][i], safe, "edited", digests[pid][1])]
        if batch[S.CONTROL_IMAGE][i] is not None:
            control = batch[S.CONTROL_IMAGE][i]
            roles.append((control, unsafe, "control", _control_digest(control, checked, max_pixels)))
        for image, label, role, digest in roles:
            values = (image, label, batch[S.CATEGORY][i], pid, S.ROLES.index(role), S.image_id(pid, role),
                      batch[S.SOURCE_ID][i], digest)
            for name, value in zip(out, values):
                out[name].append(value)
    return out


def _control_digest(cell: Any, checked: dict[str, ImageCheck], max_pixels: int) -> str | None:
    """A control image's pixel digest (``None`` when it cannot be read: the control is optional)."""
    try:
        return pixel_digest(cell, checked, max_pixels)
    except ImageError:
        return None


def _map(dataset: Dataset, fn: Any, features: Features, desc: str, **kwargs: Any) -> Dataset:
    if len(dataset) == 0:
        return empty_dataset(features)
    return dataset.map(
        fn,
        batched=True,
        batch_size=ROW_GROUP_SIZE,
        writer_batch_size=ROW_GROUP_SIZE,
        remove_columns=dataset.column_names,
        features=features,
        desc=desc,
        **kwargs,
    )


def _with_reasons(rows: Dataset, reasons: list[str | None]) -> Dataset:
    """``rows`` with the given reject reasons replacing theirs (``None`` keeps a row's own)."""
    if not any(reasons):
        return rows
    old = rows[S.REJECT_REASON] if S.REJECT_REASON in rows.column_names else [None] * len(rows)
    merged = [new or prev for new, prev in zip(reasons, old)]
    rows = rows.remove_columns([c for c in (S.REJECT_REASON,) if c in rows.column_names])
    return rows.add_column(S.REJECT_REASON, merged, feature=Value("string"))


def _with_pair_ids(source: Dataset, max_pixels: int, checked: dict[str, ImageCheck]) -> Dataset:
    """``source`` (undecoded) with each row's content pair id and its unreadable image columns (written as
    null); an accepted row with one is rejected instead (``unreadable`` / ``too_large``, detail in ``validate_error``).
    A cell ``checked`` records is not decoded: its pixel digest is the recorded one."""
    cols = [c for c in (S.POLICY, S.CATEGORY, S.IMAGE, S.EDITED_IMAGE, S.SOURCE_ID, S.ACCEPTED)
            if c in source.column_names]
    ids: list[str | None] = []
    unreadable: list[list[str]] = []
    pixel_digests: list[list[str | None]] = []
    failed: dict[int, tuple[str, str]] = {}  # accepted row -> (status, error naming the row)
    for i, row in enumerate(progress(source.select_columns(cols), desc="release pair ids", total=len(source))):
        digests, bad = {}, []
        for column in (S.IMAGE, S.EDITED_IMAGE):
            try:
                digests[column] = None if row[column] is None else pixel_digest(row[column], checked, max_pixels)
            except ImageError as err:
                bad.append(column)
                if row[S.ACCEPTED] and i not in failed:
                    failed[i] = (err.status, f"release: row {row[S.SOURCE_ID]!r}: {column}: {err}")
                    logger.warning("%s; the candidate is rejected", failed[i][1])
        ids.append(None if bad or None in digests.values() else
                   _content_id(row.get(S.POLICY), row[S.CATEGORY], digests[S.IMAGE], digests[S.EDITED_IMAGE]))
        unreadable.append(bad)
        pixel_digests.append([digests.get(S.IMAGE), digests.get(S.EDITED_IMAGE)])
    source = source.add_column(_PAIR, ids, feature=Value("string"))
    source = source.add_column(_DIGESTS, pixel_digests, feature=Sequence(Value("string")))
    source = source.add_column(_UNREADABLE, unreadable, feature=Sequence(Value("string")))
    if not failed:
        return source
    errors = source[S.VALIDATE_ERROR] if S.VALIDATE_ERROR in source.column_names else [None] * len(source)
    columns = {S.ACCEPTED: ([bool(ok) and i not in failed for i, ok in enumerate(source[S.ACCEPTED])], "bool"),
               S.VALIDATE_ERROR: ([failed[i][1] if i in failed else e for i, e in enumerate(errors)], "string")}
    source = _with_reasons(source, [failed[i][0] if i in failed else None for i in range(len(source))])
    for name, (values, dtype) in columns.items():
        source = source.remove_columns([name] if name in source.column_names else [])
        source = source.add_column(name, values, feature=Value(dtype))
    return source


def _with_review(rows: Dataset, review: ReviewResult) -> Dataset:
    """The release's use of human review: an automatically accepted candidate reviewers did not verify is not
    released (fate ``not_reviewed`` / ``human_rejected:<reason>``, the count in ``reject_detail``); automatic
    rejections stay rejected whatever the reviewers said. Adds ``human_verified`` and ``n_reviewers``; only
    non-image columns are read or rewritten."""
    from safetypairs.review.store import candidate_ids, majority

    majorities = [review.majorities.get(cid) or majority({}, review.min_reviewers) for cid in candidate_ids(rows)]
    accepted = rows[S.ACCEPTED]
    column = lambda name: rows[name] if name in rows.column_names else [None] * len(rows)  # noqa: E731
    keep = [bool(a) and m.human_verified for a, m in zip(accepted, majorities)]
    columns = {
        S.ACCEPTED: (keep, Value("bool")),
        S.REJECT_REASON: ([prev if not a else m.reason for prev, a, m in zip(column(S.REJECT_REASON), accepted,
                                                                               majorities)], Value("string")),
        S.REJECT_DETAIL: ([prev if not a else m.detail for prev, a, m in zip(column(S.REJECT_DETAIL), accepted,
                                                                              majorities)], Value("string")),
        S.HUMAN_VERIFIED: ([m.human_verified for m in majorities], Value("bool")),
        S.N_REVIEWERS: ([m.n_reviewers for m in majorities], Value("int32")),
    }
    rows = rows.remove_columns([c for c in columns if c in rows.column_names])
    for name, (values, feature) in columns.items():
        rows = rows.add_column(name, values, feature=feature)
    logger.info("review: %d of %d automatically accepted candidates verified by reviewers",
                sum(keep), sum(bool(a) for a in accepted))
    return rows


def _release_funnel(validated: Dataset, released: int) -> list[dict[str, Any]]:
    """Sources -> instructed -> edited -> accepted -> released; each step's statuses say why rows stopped there.

    Rows set aside as safe (``not_unsafe``) are counted at the sources step, apart from the failures.
    """
    n = len(validated)
    cols = validated.column_names
    column = lambda name: validated[name] if name in cols else [None] * n  # noqa: E731
    instruct, edit, accepted, reasons = (column(S.INSTRUCT_STATUS), column(S.EDIT_STATUS), column(S.ACCEPTED),
                                         column(S.REJECT_REASON))
    safe_sources = {src for src, st in zip(validated[S.SOURCE_ID], instruct) if st == ST.NOT_UNSAFE}
    unsafe = [i for i in range(n) if instruct[i] != ST.NOT_UNSAFE]
    instructed = [i for i in unsafe if instruct[i] in (None, ST.OK)]
    edited = [i for i in instructed if edit[i] in (None, ST.OK)]
    was_instructed, was_edited = set(instructed), set(edited)
    n_accepted = sum(bool(accepted[i]) for i in edited)
    n_sources = len(set(validated[S.SOURCE_ID]))

    def why(rows: list[int], values: list[Any]) -> dict[str, int]:
        return dict(Counter(values[i] or ST.NO_REASON for i in rows).most_common())

    return [
        {"stage": "sources", "rows_in": n_sources, "rows_out": n_sources - len(safe_sources),
         "statuses": {ST.NOT_UNSAFE: len(safe_sources)} if safe_sources else {}},
        {"stage": "instructed", "rows_in": len(unsafe), "rows_out": len(instructed),
         "statuses": why([i for i in unsafe if i not in was_instructed], instruct)},
        {"stage": "edited", "rows_in": len(instructed), "rows_out": len(edited),
         "statuses": why([i for i in instructed if i not in was_edited], edit)},
        {"stage": "accepted", "rows_in": len(edited), "rows_out": n_accepted,
         "statuses": why([i for i in edited if not accepted[i]], reasons)},
        {"stage": "released", "rows_in": n_accepted, "rows_out": released, "statuses": {}},
    ]


def _funnel_text(funnel: list[dict[str, Any]]) -> str:
    return "; ".join(f"{step['stage']} {step['rows_out']}/{step['rows_in']} {step['statuses']}" for step in funnel)


def assemble(validated: Dataset, config: ReleaseConfig | None = None, review: ReviewResult | None = None) -> Release:
    """Build the release configs from validated candidate rows.

    Args:
        validated: candidate rows with the source, edit and validation columns of `schema`
            (required: ``source_id, image, edited_image, category, accepted``; others may be missing).
        config: split and content options (default `ReleaseConfig()`).
        review: human verdicts (`review.store.load_review`): only candidates reviewers verified are
            released, the others go to ``rejected`` with ``human_rejected:<reason>`` / ``not_reviewed``.

    Returns:
        A `Release`: ``pairs`` and ``images`` (and ``rejected``) as `DatasetDict`s with the same splits.

    Raises:
        ValueError: if a required column is missing or no candidate was accepted.
    """
    config = config or ReleaseConfig()
    missing = [c for c in REQUIRED_COLUMNS if c not in validated.column_names]
    if missing:
        raise ValueError(f"validated rows lack required columns {missing}; have {validated.column_names}")
    if review is not None:
        validated = _with_review(validated, review)
    checked = recorded(validated[S.IMAGE_CHECKS]) if S.IMAGE_CHECKS in validated.column_names else {}
    source = _with_pair_ids(undecoded(validated), config.max_pixels, checked)
    best = best_candidates(source)
    pairs = _released(source.select(best), S.PAIR_FEATURES, "release pairs", config.max_pixels, checked)
    # identical images from two sources give one pair_id: keep the first, or it could sit in both splits
    first_of: dict[str | None, int] = {}
    for i, pid in enumerate(pairs[S.PAIR_ID]):
        first_of.setdefault(pid, i)
    first = sorted(first_of.values())
    duplicates = set(best) - {best[i] for i in first}
    pairs, best = pairs.select(first), [best[i] for i in first]
    funnel = _release_funnel(source, len(pairs))
    if not len(pairs):
        raise ValueError(f"no accepted candidate to release among {len(validated)} rows "
                         f"(funnel: {_funnel_text(funnel)})")
    splits = split_by_source(pairs[S.SOURCE_ID], pairs[S.CATEGORY], config)
    configs = {"pairs": DatasetDict({name: pairs.select(rows) for name, rows in splits.items()})}
    digests = dict(zip(pairs[S.PAIR_ID], source.select_columns([_DIGESTS]).select(best)[_DIGESTS]))
    configs["images"] = DatasetDict(
        {name: _map(undecoded(ds), _images_batch, S.IMAGE_FEATURES, f"release images/{name}",
                    fn_kwargs={"digests": digests, "max_pixels": config.max_pixels, "checked": checked})
         for name, ds in configs["pairs"].items()}
    )
    if config.include_rejected:
        chosen = set(best)
        rest = [i for i in range(len(source)) if i not in chosen]
        rejected = _with_reasons(source.select(rest), [ST.DUPLICATE_PAIR if i in duplicates else None for i in rest])
        configs["rejected"] = DatasetDict({"test": _released(rejected, REJECTED_FEATURES, "release rejected",
                                                             config.max_pixels, checked)})
    composited = _composited(source, best)
    logger.info("release: %d candidates -> %d pairs %s", len(validated), len(pairs),
                {name: len(ds) for name, ds in configs["pairs"].items()})
    # `load_dataset` cannot read a split with no rows: leave empty splits (and configs) out
    configs = {name: DatasetDict({s: ds for s, ds in dd.items() if len(ds)}) for name, dd in configs.items()}
    return Release({name: dd for name, dd in configs.items() if dd}, funnel, review.summary if review else None,
                   composited, checked)


def _composited(source: Dataset, rows: list[int]) -> int:
    """How many of ``rows`` validation composited (``composite`` in their ``metrics_ran``; 0 without the column)."""
    if S.METRICS_RAN not in source.column_names:
        return 0
    ran = source.select_columns([S.METRICS_RAN]).select(rows)[S.METRICS_RAN]
    return sum("composite" in (metrics or []) for metrics in ran)


