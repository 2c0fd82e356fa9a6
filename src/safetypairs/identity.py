"""Image identity across datasets: a pixel digest per image, source groups, and the check that keeps an
evaluation set disjoint from training (no shared image, no shared source).

Two rows are the *same image* when their pixel digests (`images.image_digest`) are equal, whatever
their file names or ids. Inside one dataset, rows that share a ``source_id`` (else a ``pair_id``) form
a *source group*: the original of a pair, its edit and its control. Two groups are the *same source*
when they hold a common image. A ``source_id`` alone is not an identity across datasets: two folders
that both hold ``images/safe_00.png`` name two different photos, so ids are compared only inside one
dataset, or when no digest is available (then the check says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from safetypairs.images import DEFAULT_MAX_PIXELS, ImageError, image_digest, load_image
from safetypairs import statuses as ST
from safetypairs.schema import IMAGE, IMAGE_DIGEST, PAIR_ID, SOURCE_ID

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Identity:
    """Who each row of a dataset is.

    Attributes:
        name: the dataset's short name (``base``, ``pairs``, ``eval``, ``natural``...); it namespaces groups.
        groups: per row, its source group inside the dataset (``source_id``, else ``pair_id``, else the row).
        digests: per row, the pixel digest of its image, or ``None`` when unknown.
        ids: per row, the ``source_id`` / ``pair_id`` as the dataset names it (``None`` when it has none).
    """

    name: str
    groups: np.ndarray
    digests: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def has_digests(self) -> bool:
        """Whether the rows carry digests (a row whose image could not be read may still have none)."""
        return any(d is not None for d in self.digests)

    def take(self, index: np.ndarray) -> Identity:
        """The rows at ``index``."""
        return Identity(self.name, self.groups[index], self.digests[index], self.ids[index])


def identity_of(columns: Any, name: str, digests: list[str | None] | None = None) -> Identity:
    """The identity of a dataset's rows from its ``source_id`` / ``pair_id`` and ``image_digest`` columns.

    Args:
        columns: a `datasets.Dataset` or a mapping of column name -> values.
        name: the dataset's short name; groups are namespaced by it (``eval:images/a.png``).
        digests: the rows' digests when the caller computed them (default: the ``image_digest`` column).

    Returns:
        The `Identity`.
    """
    names = list(columns.column_names) if hasattr(columns, "column_names") else list(columns)
    n = len(columns) if hasattr(columns, "column_names") else len(next(iter(columns.values()), []))
    ids: list[Any] = [None] * n
    for column in (SOURCE_ID, PAIR_ID):
        if column in names:
            ids = [None if v in (None, "") else str(v) for v in columns[column]]
            break
    if digests is None:
        digests = list(columns[IMAGE_DIGEST]) if IMAGE_DIGEST in names else [None] * n
    groups = [f"{name}:{v}" if v is not None else f"{name}#{i}" for i, v in enumerate(ids)]
    return Identity(name, np.array(groups, dtype=object), np.array(digests, dtype=object), np.array(ids, dtype=object))


def image_digests(images: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str | None]:
    """The pixel digest of every image cell (``None`` for a cell that cannot be read within the cap)."""
    out: list[str | None] = []
    for cell in images:
        try:
            out.append(None if cell is None else image_digest(load_image(cell, max_pixels)))
        except ImageError:
            out.append(None)
    return out


def with_digests(rows: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """A `datasets.Dataset` with an ``image_digest`` column (computed from ``image`` when it has none)."""
    if IMAGE_DIGEST in rows.column_names or IMAGE not in rows.column_names:
        return rows
    from datasets import Image

    cells = rows.select_columns([IMAGE]).cast_column(IMAGE, Image(decode=False))[IMAGE]
    digests = image_digests(cells, max_pixels)
    return rows.add_column(IMAGE_DIGEST, digests)


@dataclass(frozen=True)
class Exclusion:
    """Which eval rows are kept, and why the others were left out.

    Attributes:
        keep: per eval row, whether it shares nothing with training.
        reasons: per eval row, ``None`` or why it was left out (`statuses.SAME_IMAGE`, ``SAME_SOURCE``, ``SAME_SOURCE_ID``).
        by: what identity was compared: ``"image digest"`` or ``"source id"`` (when a side has no digests).
        id_matches_kept: kept eval rows whose source id names a training row too (different images: ids
            from two datasets name different things).
    """

    keep: np.ndarray
    reasons: np.ndarray
    by: str
    id_matches_kept: int = 0

    @property
    def counts(self) -> dict[str, int]:
        """How many eval rows were left out, per reason."""
        values, counts = np.unique([r for r in self.reasons if r is not None], return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}

    def summary(self) -> dict[str, Any]:
        """A JSON-ready account: rows in, kept, left out per reason, what was compared."""
        return {"rows": int(len(self.keep)), "kept": int(self.keep.sum()), "excluded": self.counts,
                "compared_by": self.by, "source_id_matches_kept": self.id_matches_kept}

    def describe(self, what: str = "eval") -> str:
        """One sentence: ``"left out 11 of 17 eval rows that are training images (same_image 11), compared by image digest"``."""
        dropped = int((~self.keep).sum())
        if not dropped:
            text = f"no {what} row shares an image or a source with training (compared by {self.by})"
        else:
            parts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
            text = (f"left out {dropped} of {len(self.keep)} {what} rows that share an image or a source with "
                    f"training ({parts}; compared by {self.by})")
        if self.id_matches_kept:
            text += (f"; {self.id_matches_kept} kept rows share only a source id with training rows (different "
                     "images: ids from different datasets are not compared)")
        return text


def exclude_shared(evaluation: Identity, *training: Identity) -> Exclusion:
    """Leave out the eval rows that are, or share a source with, any training row.

    An eval row is left out when its image is a training image (``same_image``), or when another row of
    its source group is (``same_source``: the edit of a training original, the original of a training
    edit). When the eval rows or a training set carry no digests, source ids are compared instead
    (``same_source_id``) and ``by`` says so.

    Args:
        evaluation: the eval rows' identity.
        *training: every set the models were trained on (base rows, the whole pair pool, ...).

    Returns:
        The `Exclusion`.
    """
    train_ids = {i for t in training for i in t.ids if i is not None}
    seen = {d for t in training for d in t.digests if d is not None}
    by_digest = bool(seen) and all(t.has_digests for t in training if len(t))
    reasons = np.full(len(evaluation), None, dtype=object)
    hit = np.array([by_digest and d is not None and d in seen for d in evaluation.digests], dtype=bool)
    shared_groups = set(evaluation.groups[hit])
    for i, (group, digest, value) in enumerate(zip(evaluation.groups, evaluation.digests, evaluation.ids)):
        if hit[i]:
            reasons[i] = ST.SAME_IMAGE
        elif group in shared_groups:
            reasons[i] = ST.SAME_SOURCE
        elif (not by_digest or digest is None) and value is not None and value in train_ids:
            reasons[i] = ST.SAME_SOURCE_ID
    keep = np.array([r is None for r in reasons], dtype=bool)
    id_kept = int(sum(1 for i, v in enumerate(evaluation.ids) if keep[i] and v is not None and v in train_ids))
    unchecked = not by_digest or any(d is None for d in evaluation.digests)
    by = "image digest" if not unchecked else ("source id" if not by_digest else "image digest, source id where a row has none")
    return Exclusion(keep, reasons, by, id_kept)


def merged_groups(*parts: Identity) -> np.ndarray:
    """One group label per row of the concatenated parts, merging groups that hold a common image.

    Rows of one source stay together (a pair's images, a natural image and the edit made from it), so a
    split by these groups never puts an image on one side and its copy or edit on the other.
    """
    groups = np.concatenate([p.groups for p in parts]) if parts else np.array([], dtype=object)
    digests = np.concatenate([p.digests for p in parts]) if parts else np.array([], dtype=object)
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group, digest in zip(groups, digests):
        find(group)
        if digest is not None:
            parent[find(group)] = find(("digest", digest))
    return np.array([str(find(g)) for g in groups], dtype=object)
