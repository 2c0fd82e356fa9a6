"""The judge: classify each original and its edit, and record the label flip (the decision is `decision.decide_judge`)."""

from __future__ import annotations

import json
from typing import Any

from safetypairs import schema as S
from safetypairs.backends.registry import load_backend
from safetypairs.engine.stage import isolate
from safetypairs.policy import load_policy
from safetypairs.validate.decision import decide_judge, judge_failed
from safetypairs.validate.originals import Originals, split
from safetypairs.validate.pair import PairImages, row_name


def verdict_json(verdict: Any) -> str:
    """A judge `Verdict` as a JSON string for the ``judge_*_raw`` columns."""
    return json.dumps({"label": verdict.label, "score": verdict.score, "rationale": verdict.rationale,
                       "raw": verdict.raw}, ensure_ascii=False)


def judge_rows(config: Any, batch: dict[str, list], pairs: list[PairImages], rows: list[dict[str, Any]],
               device: str, originals: Originals) -> None:
    """Classify originals and edits with the judge; `decision.decide_judge` records the label flip (in place).

    An original is classified once per category in a run: its other candidates (in this batch or a later one)
    reuse the verdict from ``originals`` (a verdict without an answer, e.g. ``api_error``, is not kept).

    Rows the pixel checks rejected are skipped unless ``config.judge_all_rows``. A row the judge
    raises on gets ``validate_status=judge_error`` (reject reason ``judge_error`` unless the pixels
    already rejected it) and the error in ``validate_error``; the other rows are judged as usual.

    Args:
        config: judge spec, policy and category column.
        batch: the input batch (for categories).
        pairs: readable pairs (full-resolution PIL images inside).
        rows: output rows, indexed by ``pair.index``.
        device: torch device for model judges.
        originals: the verdicts on originals given so far in this run.
    """
    targets = [p for p in pairs if config.judge_all_rows or rows[p.index][S.REJECT_REASON] is None]
    if config.judge is None or not targets:
        return
    judge = load_backend("judges", config.judge, device)
    column = batch.get(config.category_column)
    policy = load_policy(config.policy)

    def classify(some: list[PairImages]) -> list[tuple[Any, Any]]:
        categories = [column[p.index] if column else None for p in some]
        keys = [(p.original_key, category) for p, category in zip(some, categories)]
        known, todo = split(originals.verdicts, keys)
        verdicts = judge.classify([some[t].original_image for t in todo] + [p.edited_image for p in some],
                                  [categories[t] for t in todo] + categories, policy)
        if len(verdicts) != len(todo) + len(some):
            raise ValueError(f"the judge returned {len(verdicts)} verdicts for {len(todo) + len(some)} images")
        for t, verdict in zip(todo, verdicts):
            known[keys[t]] = verdict
            if not verdict.status:
                originals.verdicts.put(keys[t], verdict)
        return [(known[key], after) for key, after in zip(keys, verdicts[len(todo):])]

    for pair, (verdicts, error) in zip(targets, isolate(classify, targets)):
        row = rows[pair.index]
        row[S.JUDGE] = config.judge
        if error is not None:
            judge_failed(row, f"{row_name(batch, pair.index)}: judge {config.judge} failed: {error}")
            continue
        before, after = verdicts
        if before.status or after.status:  # the judge could not answer for one image (a served model's api_error)
            failed = before if before.status else after
            judge_failed(row, f"{row_name(batch, pair.index)}: judge {config.judge}: {failed.rationale}", failed.status)
            continue
        row.update({S.JUDGE_ORIGINAL: before.label, S.JUDGE_EDITED: after.label,
                    S.JUDGE_ORIGINAL_RAW: verdict_json(before), S.JUDGE_EDITED_RAW: verdict_json(after)})
        row[S.METRICS_RAN].append(f"judge:{config.judge}")
        decide_judge(row, config.judge, before.label, after.label)
