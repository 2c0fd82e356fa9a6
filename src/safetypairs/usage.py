"""What a served model sent and got (`Usage`): counts that add up across chunks, passes and ranks, with latency
percentiles read from a mergeable histogram."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

LATENCY_BUCKETS = tuple(0.05 * 2 ** i for i in range(12))  # 50 ms .. 102 s, for mergeable percentiles


@dataclass
class Usage:
    """What one backend instance sent and got: counts that add up across chunks and ranks.

    Attributes:
        requests: HTTP requests sent (retries included).
        answers: answers received from the server.
        cache_hits: answers read from the cache (no request).
        failures: requests that failed after every retry (rows with ``api_error``).
        prompt_tokens / completion_tokens: the server's own token counts.
        scored_by_logprobs / scored_by_text: answers whose score came from logprobs, or that had none.
        latency: answers per latency bucket (`LATENCY_BUCKETS` upper bounds, seconds, then one overflow bucket).
    """

    requests: int = 0
    answers: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scored_by_logprobs: int = 0
    scored_by_text: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def counts(self) -> dict[str, Any]:
        """The raw counts (what a chunk marker stores; `from_counts` reads them back)."""
        return {f.name: list(self.latency) if f.name == "latency" else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_counts(cls, counts: dict[str, Any]) -> Usage:
        """The `Usage` that `counts` wrote (unknown keys ignored, missing ones zero)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: list(v) if k == "latency" else int(v) for k, v in counts.items() if k in names})

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{f.name: [a + b for a, b in zip(self.latency, other.latency)] if f.name == "latency"
                        else getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: Usage) -> Usage:
        return Usage(**{f.name: [a - b for a, b in zip(self.latency, other.latency)] if f.name == "latency"
                        else getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def __bool__(self) -> bool:
        return any(self.latency) or any(getattr(self, f.name) for f in fields(self) if f.name != "latency")

    def as_dict(self) -> dict[str, Any]:
        """Plain counts, ``retries`` (requests beyond one per answer or failure), ``score_from`` (``logprobs``,
        ``text``, ``both`` or ``None``) and latency percentiles."""
        out = {k: v for k, v in self.counts().items() if k != "latency"}
        out["retries"] = max(0, self.requests - self.answers - self.failures)
        out["score_from"] = ("both" if self.scored_by_logprobs and self.scored_by_text else "logprobs"
                             if self.scored_by_logprobs else "text" if self.scored_by_text else None)
        out["latency_buckets"] = list(self.latency)
        out.update(latency_percentiles(self.latency))
        return out


def latency_percentiles(buckets: list[int]) -> dict[str, float | None]:
    """p50 / p90 / p99 (seconds, each a bucket's upper bound) of a latency histogram (`LATENCY_BUCKETS`)."""
    total = sum(buckets)
    out: dict[str, float | None] = {}
    for q in (50, 90, 99):
        if not total:
            out[f"latency_p{q}_s"] = None
            continue
        need, seen = math.ceil(total * q / 100), 0
        for bound, n in zip((*LATENCY_BUCKETS, math.inf), buckets):
            seen += n
            if seen >= need:
                out[f"latency_p{q}_s"] = None if math.isinf(bound) else round(bound, 3)
                break
    return out


def merge_usage(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Sum usage records ``{"kind", "spec", "counts"}`` (chunk markers of every rank) per backend.

    Returns:
        ``{kind: {spec: Usage.as_dict()}}``.
    """
    total: dict[tuple[str, str], Usage] = {}
    for record in records:
        key = (record["kind"], record["spec"])
        total[key] = total.get(key, Usage()) + Usage.from_counts(record["counts"])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (kind, spec), usage in total.items():
        out.setdefault(kind, {})[spec] = usage.as_dict()
    return out
