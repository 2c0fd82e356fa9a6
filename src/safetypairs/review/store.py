"""Human review: decisions in ``review.jsonl`` beside the data, majority verdicts and reviewer agreement."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

from datasets import Dataset

from safetypairs import __version__
from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.engine.stage import undecoded

logger = logging.getLogger(__name__)

DECISIONS_FILE = "review.jsonl"
STATS_FILE = "review_stats.json"  # review-stats' output (not results.json: that is evaluate's)
APP_VERSION = f"safetypairs-review/{__version__}"
ACCEPT, REJECT = "accept", "reject"
DECISIONS = (ACCEPT, REJECT)
# Why a reviewer rejects a candidate (the app's list; "other" wants a note).
REASONS = {
    "not_local": "the edit changes more than the violating element",
    "still_unsafe": "the edited image still violates the policy",
    "original_not_unsafe": "the original does not violate the policy",
    "artifact": "the edit left visible artifacts",
    "other": "another reason (see the note)",
}
# What a verdict is about: a decision stores a stamp of these cells, so it never counts for other images.
CONTENT_COLUMNS = (S.IMAGE, S.EDITED_IMAGE)


def candidate_id(source_id: str, candidate: int | None) -> str:
    """The stable id of a validated candidate row: its source id and candidate index (``src-001#0``)."""
    return f"{source_id}#{candidate or 0}"


def candidate_ids(rows: Dataset) -> list[str]:
    """Candidate ids of every row, read from the ``source_id`` and ``candidate`` columns only.

    Args:
        rows: validated candidate rows.

    Returns:
        One id per row, in row order.

    Raises:
        ValueError: if ``source_id`` is missing or two rows share an id.
    """
    if S.SOURCE_ID not in rows.column_names:
        raise ValueError(f"rows lack the {S.SOURCE_ID!r} column; have {rows.column_names}")
    cands = rows[S.CANDIDATE] if S.CANDIDATE in rows.column_names else [0] * len(rows)
    ids = [candidate_id(src, c) for src, c in zip(rows[S.SOURCE_ID], cands)]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise ValueError(f"candidate ids must be unique (source_id, candidate); repeated: {dupes[:5]}")
    return ids


def cell_bytes(cell: dict[str, Any] | None) -> bytes | None:
    """The stored bytes of an undecoded image cell (read from its path when it holds none); ``None`` when empty."""
    if not cell:
        return None
    return cell.get("bytes") or (Path(cell["path"]).read_bytes() if cell.get("path") else None)


def content_stamp(cells: Iterable[dict[str, Any] | None]) -> str:
    """A short hash of a candidate's stored image bytes (the `CONTENT_COLUMNS` cells, in that order).

    A decision carries the stamp of the images the reviewer saw; validation passes image bytes through
    unchanged, so a re-validated folder keeps its stamps unless the images changed (a new edit, ``--composite``).
    """
    h = hashlib.sha256()
    for cell in cells:
        data = cell_bytes(cell) or b""
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def candidate_stamps(rows: Dataset) -> list[str]:
    """`content_stamp` of every row, in row order (reads the stored bytes, decodes nothing)."""
    columns = [c for c in CONTENT_COLUMNS if c in rows.column_names]
    plain = undecoded(rows.select_columns(columns))
    return [content_stamp(row[c] for c in columns) for row in plain]


def split_stale(records: list[dict[str, Any]], stamps: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records about the images each candidate has now, and stale ones made on other images under the same id.

    A record without a stamp (written before stamps existed) or about an id not in ``stamps`` is not stale.

    Args:
        records: decision records (`read_decisions`).
        stamps: candidate id -> its current `content_stamp`.

    Returns:
        ``(current, stale)``, each in write order.
    """
    current, stale = [], []
    for record in records:
        stamp, now = record.get("content"), stamps.get(record["candidate_id"])
        (stale if stamp and now and stamp != now else current).append(record)
    return current, stale


def make_decision(reviewer: str, cid: str, decision: str, reason: str | None = None, note: str = "",
                  content: str | None = None) -> dict[str, Any]:
    """A checked decision record, stamped with the UTC time and the app version.

    Args:
        reviewer: who decided (non-empty, one line).
        cid: the candidate id (`candidate_id`).
        decision: ``"accept"`` or ``"reject"``.
        reason: for a rejection, one of `REASONS`.
        note: free text (needed for reason ``"other"``).
        content: the `content_stamp` of the images decided on (a decision for other images is stale).

    Returns:
        The record as written to ``review.jsonl``.

    Raises:
        ValueError: for an empty reviewer, an unknown decision or a missing or unknown reason.
    """
    if not reviewer.strip() or "\n" in reviewer:
        raise ValueError(f"reviewer must be a non-empty single line, got {reviewer!r}")
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if decision == REJECT and reason not in REASONS:
        raise ValueError(f"a rejection needs a reason from {list(REASONS)}, got {reason!r}")
    if reason == "other" and not note.strip():
        raise ValueError("reason 'other' needs a note")
    return {"reviewer": reviewer.strip(), "candidate_id": cid, "decision": decision,
            "reason": reason if decision == REJECT else None, "note": note.strip(), "content": content,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "app_version": APP_VERSION}


def append_decision(folder: str | Path, record: dict[str, Any]) -> None:
    """Append one record to ``folder/review.jsonl`` as one locked ``O_APPEND`` write (safe across processes).

    Args:
        folder: the reviewed data folder.
        record: a record from `make_decision`.

    Raises:
        OSError: if the line could not be written whole.
    """
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()
    fd = os.open(Path(folder) / DECISIONS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    if written != len(line):
        raise OSError(f"short write to {DECISIONS_FILE}: {written} of {len(line)} bytes")


def read_decisions(folder: str | Path) -> list[dict[str, Any]]:
    """Every record of ``folder/review.jsonl`` in write order (none when the file is absent).

    A line that is not a JSON object (a writer killed mid-line) is skipped with a warning naming it.
    """
    path = Path(folder) / DECISIONS_FILE
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and record.get("decision") in DECISIONS:
            records.append(record)
        elif line.strip():
            logger.warning("%s line %d is not a decision record; skipped", path, number)
    return records


def latest_decisions(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Candidate id -> reviewer -> that reviewer's last record (earlier ones stay in the file as history)."""
    latest: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        latest[record["candidate_id"]][record["reviewer"]] = record
    return dict(latest)


@dataclass(frozen=True)
class Majority:
    """What the reviewers decided on one candidate, by strict majority of each reviewer's last decision.

    Attributes:
        n_reviewers: reviewers whose last decision is accept or reject.
        human_verified: at least ``min_reviewers`` decided and a strict majority accepted.
        reason: the fate when not verified (``not_reviewed`` or ``human_rejected:<reason>``), else ``None``.
        detail: what decided it, in words (``1 of 2 reviewers``, ``2 of 3 reject``).
    """

    n_reviewers: int
    human_verified: bool
    reason: str | None
    detail: str | None = None


def majority(decisions: dict[str, dict[str, Any]], min_reviewers: int) -> Majority:
    """The reviewers' majority from reviewer -> last record (ties and missing reviews are not verified).

    Args:
        decisions: each reviewer's last record for one candidate (may be empty).
        min_reviewers: reviewers needed before a majority counts.

    Returns:
        The `Majority`; a rejection names the most common reason among the rejecting reviewers.
    """
    votes = Counter(r["decision"] for r in decisions.values())
    n = votes[ACCEPT] + votes[REJECT]
    if n < min_reviewers:
        return Majority(n, False, ST.NOT_REVIEWED, f"{n} of {min_reviewers} reviewers decided")
    if votes[ACCEPT] > votes[REJECT]:
        return Majority(n, True, None)
    reasons = Counter(r["reason"] for r in decisions.values() if r["decision"] == REJECT)
    top = min(reasons, key=lambda r: (-reasons[r], r)) if votes[REJECT] > votes[ACCEPT] else "no_majority"
    return Majority(n, False, ST.human_rejected(top), f"{votes[REJECT]} of {n} reviewers reject")


@dataclass(frozen=True)
class ReviewResult:
    """What a release needs from a review: the majority per candidate id, the rule, and the card's summary."""

    majorities: dict[str, Majority]
    min_reviewers: int
    summary: dict[str, Any] = field(default_factory=dict)


def load_review(folder: str | Path, rows: Dataset, min_reviewers: int = 1) -> ReviewResult:
    """Read ``folder/review.jsonl`` and decide every candidate of ``rows`` by majority.

    Decisions are keyed by candidate id; one made on other images than the row's (its stamp differs:
    the rows were re-made since, e.g. kept across ``validate --overwrite``) is not counted, with a warning.

    Args:
        folder: the reviewed data folder.
        rows: its validated candidate rows.
        min_reviewers: reviewers needed per candidate (at least 1).

    Returns:
        A `ReviewResult` whose summary holds the protocol and `agreement`.

    Raises:
        ValueError: if ``min_reviewers`` < 1 or the folder has no decisions.
    """
    if min_reviewers < 1:
        raise ValueError(f"min_reviewers must be >= 1, got {min_reviewers}")
    records = read_decisions(folder)
    if not records:
        raise ValueError(f"no review decisions in {str(Path(folder) / DECISIONS_FILE)!r}; run `safetypairs review` first")
    ids = candidate_ids(rows)
    records, stale = split_stale(records, dict(zip(ids, candidate_stamps(rows))))
    if stale:
        logger.warning("review: %d decision(s) on %d candidate(s) were made on other images than the rows have now "
                       "(re-edited or re-validated since); not counted: review those candidates again", len(stale),
                       len({r["candidate_id"] for r in stale}))
    latest = latest_decisions(records)
    majorities = {cid: majority(latest.get(cid, {}), min_reviewers) for cid in ids}
    summary = {"min_reviewers": min_reviewers, "rule": "strict majority of each reviewer's last decision",
               "reasons": REASONS, "agreement": agreement(rows, records), "stale_decisions": len(stale)}
    return ReviewResult(majorities, min_reviewers, summary)


def _kappa(a: list[int], b: list[int]) -> dict[str, Any]:
    """Cohen's kappa of two label lists over the same items (``None`` when undefined)."""
    from sklearn.metrics import cohen_kappa_score

    out: dict[str, Any] = {"n": len(a), "agreement": None, "kappa": None}
    if a:
        out["agreement"] = sum(x == y for x, y in zip(a, b)) / len(a)
    if len(set(a) | set(b)) > 1:  # one shared label: kappa is 0/0
        kappa = float(cohen_kappa_score(a, b))
        out["kappa"] = None if math.isnan(kappa) else kappa
    return out


def _reference_labels(rows: Dataset) -> dict[str, list[int | None]]:
    """Per row, the automatic decision (``accepted``) and the judge's (original unsafe and edit safe) as 1/0."""
    labels: dict[str, list[int | None]] = {"automatic": [int(bool(a)) for a in rows[S.ACCEPTED]]}
    if S.JUDGE_ORIGINAL in rows.column_names and S.JUDGE_EDITED in rows.column_names:
        labels["judge"] = [None if S.UNKNOWN in (o, e) or None in (o, e) else int(o == S.UNSAFE and e == S.SAFE)
                           for o, e in zip(rows[S.JUDGE_ORIGINAL], rows[S.JUDGE_EDITED])]
    return labels


def agreement(rows: Dataset, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and Cohen's kappa (scikit-learn) between reviewers, and of each reviewer with the checks.

    Args:
        rows: the validated candidate rows the decisions refer to.
        records: every decision record (`read_decisions`); each reviewer's last decision counts.

    Returns:
        ``{reviewers: {name: {accept, reject}}, reasons, records, superseded, between_reviewers: [...],
        vs_automatic: {name: ...}, vs_judge: {name: ...}}``; each comparison holds ``n`` (shared
        candidates), ``agreement`` (share equal) and ``kappa`` (``None`` when undefined).
    """
    ids = candidate_ids(rows)
    index = {cid: i for i, cid in enumerate(ids)}
    latest = latest_decisions([r for r in records if r["candidate_id"] in index])
    votes: dict[str, dict[str, int]] = defaultdict(dict)  # reviewer -> candidate id -> 1 accept / 0 reject
    for cid, per in latest.items():
        for reviewer, record in per.items():
            votes[reviewer][cid] = int(record["decision"] == ACCEPT)
    reviewers = sorted(votes)
    out: dict[str, Any] = {
        "reviewers": {r: {ACCEPT: sum(votes[r].values()), REJECT: len(votes[r]) - sum(votes[r].values())}
                      for r in reviewers},
        "reasons": dict(Counter(rec["reason"] for per in latest.values() for rec in per.values()
                                if rec["decision"] == REJECT).most_common()),
        "records": len(records),  # history included; "superseded" counts decisions later changed
        "superseded": len(records) - len({(r["candidate_id"], r["reviewer"]) for r in records}),
        "between_reviewers": [],
    }
    for a, b in combinations(reviewers, 2):
        shared = sorted(set(votes[a]) & set(votes[b]))
        out["between_reviewers"].append({"reviewers": [a, b], **_kappa([votes[a][c] for c in shared],
                                                                         [votes[b][c] for c in shared])})
    for name, ref in _reference_labels(rows).items():
        out[f"vs_{name}"] = {}
        for r in reviewers:
            shared = [c for c in sorted(votes[r]) if ref[index[c]] is not None]
            out[f"vs_{name}"][r] = _kappa([votes[r][c] for c in shared], [ref[index[c]] for c in shared])
    return out


def write_stats(folder: str | Path, stats: dict[str, Any]) -> Path:
    """Write ``stats`` to ``folder/review_stats.json`` (temp file + rename).

    Returns:
        The path of ``review_stats.json``.
    """
    path = Path(folder) / STATS_FILE
    tmp = path.with_name(f".{STATS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
