"""Self-contained ``report.html``: leaderboard with CIs, charts as inline SVG, pair galleries."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from safetypairs import statuses as ST
from safetypairs.images import ImageError, load_image
from safetypairs.schema import (
    CATEGORY,
    CHANGED_FRACTION,
    CONTROL_IMAGE,
    EDIT_MASK,
    INSTRUCTION,
    LABEL,
    PAIR_ID,
    REJECT_DETAIL,
    REJECT_REASON,
    ROLE,
    SAFE_IMAGE,
    SSIM_OUTSIDE,
    UNSAFE,
    UNSAFE_IMAGE,
)

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
THUMB = 224
MAX_GALLERY = 48
MAX_HARD = 12
FEW_PAIRS = 20  # below this many pairs an interval says little: the report says so beside the numbers


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def image_data_uri(cell: Any, size: int = THUMB) -> str | None:
    """A thumbnail as an inline ``data:`` URI (PNG for masks/graphics, JPEG for photos).

    Args:
        cell: anything `load_image` reads (PIL image, bytes, path, datasets dict).
        size: the longest side in pixels.

    Returns:
        The URI, or ``None`` when the cell is missing or unreadable.
    """
    try:
        image = load_image(cell)
    except ImageError:
        return None
    image.thumbnail((size, size), Image.LANCZOS)
    small_palette = len(image.getcolors(256) or ()) > 0
    buffer = io.BytesIO()
    fmt = "PNG" if small_palette else "JPEG"
    image.save(buffer, format=fmt, **({} if small_palette else {"quality": 85}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def bar_chart_svg(groups: Sequence[str], series: Mapping[str, Sequence[float | None]], label: str) -> str:
    """Grouped vertical bars in [0, 1] (one group per category, one bar per guard)."""
    width, height, left, bottom, top = max(420, 60 * len(groups) + 60), 240, 40, 30, 12
    plot_h, group_w = height - bottom - top, (width - left - 10) / max(len(groups), 1)
    bar_w = min(26.0, (group_w - 12) / max(len(series), 1))
    parts = [f'<svg viewBox="0 0 {width} {height}" class="chart" role="img" aria-label="{html.escape(label)}">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{tick:.2f}</text>')
    for g, group in enumerate(groups):
        x0 = left + g * group_w + (group_w - bar_w * len(series)) / 2
        for s, (name, values) in enumerate(series.items()):
            value = values[g]
            if value is None:
                continue
            h = plot_h * value
            parts.append(f'<rect x="{x0 + s * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
                         f'height="{h:.1f}" fill="{PALETTE[s % len(PALETTE)]}" rx="2">'
                         f'<title>{html.escape(name)} · {html.escape(group)}: {value:.3f}</title></rect>')
        parts.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{height - 12}" class="tick" '
                     f'text-anchor="middle">{html.escape(group)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def roc_svg(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
    """ROC curves of several guards on one square plot (with the chance diagonal)."""
    size, pad = 300, 40
    span = size - 2 * pad

    def xy(fpr: float, tpr: float) -> str:
        return f"{pad + fpr * span:.1f},{size - pad - tpr * span:.1f}"

    parts = [f'<svg viewBox="0 0 {size} {size}" class="chart roc" role="img" aria-label="ROC curves">',
             f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" class="frame"/>',
             f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" class="diag"/>']
    for tick in (0, 0.5, 1):
        parts.append(f'<text x="{pad + tick * span:.1f}" y="{size - pad + 16}" class="tick" text-anchor="middle">{tick}</text>'
                     f'<text x="{pad - 6}" y="{size - pad - tick * span + 4:.1f}" class="tick" text-anchor="end">{tick}</text>')
    parts.append(f'<text x="{size / 2}" y="{size - 6}" class="axis" text-anchor="middle">false positive rate</text>'
                 f'<text x="12" y="{size / 2}" class="axis" text-anchor="middle" transform="rotate(-90 12 {size / 2})">'
                 "true positive rate</text>")
    for i, (name, roc) in enumerate(curves.items()):
        points = " ".join(xy(f, t) for f, t in zip(roc["fpr"], roc["tpr"]))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="2">'
                     f"<title>{html.escape(name)}</title></polyline>")
    parts.append("</svg>")
    return "".join(parts)


def funnel_svg(funnel: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars of the rows each pipeline stage kept."""
    top_n = max([int(s.get("rows_in", 0)) for s in funnel] + [int(s.get("rows_out", 0)) for s in funnel] + [1])
    row_h, label_w, width = 30, 150, 900
    parts = [f'<svg viewBox="0 0 {width} {row_h * len(funnel) + 8}" class="chart funnel" role="img" aria-label="funnel">']
    for i, stage in enumerate(funnel):
        kept = int(stage.get("kept", stage.get("rows_out", 0)))
        w = (width - label_w - 70) * kept / top_n
        y = 4 + i * row_h
        parts.append(f'<text x="{label_w - 8}" y="{y + 20}" class="tick" text-anchor="end">{html.escape(str(stage["stage"]))}</text>'
                     f'<rect x="{label_w}" y="{y + 4}" width="{max(w, 2):.1f}" height="{row_h - 10}" rx="3" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{label_w + w + 8:.1f}" y="{y + 20}" class="tick">'
                     f"{kept}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _pair_errors(results: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{pair_id: {guard: {"original": pred, "edited": pred, "control": pred, "wrong": bool}}}``."""
    images = results.get("images") or {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for spec, preds in (results.get("predictions") or {}).items():
        for pid, role, label, pred in zip(images[PAIR_ID], images[ROLE], images[LABEL], preds["pred"]):
            cell = out.setdefault(pid, {}).setdefault(spec, {"wrong": False})
            cell[role] = pred
            if role != "control" and pred != label:
                cell["wrong"] = True
    return out


def _rows(pairs: Iterable[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    return [] if pairs is None else list(pairs)


def _pair_card(row: Mapping[str, Any], verdicts: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    return {
        "pair_id": row.get(PAIR_ID, ""),
        "category": row.get(CATEGORY, ""),
        "instruction": row.get(INSTRUCTION, ""),
        "unsafe": image_data_uri(row.get(UNSAFE_IMAGE)),
        "safe": image_data_uri(row.get(SAFE_IMAGE)),
        "control": image_data_uri(row.get(CONTROL_IMAGE)),
        "mask": image_data_uri(row.get(EDIT_MASK)),
        "changed_fraction": _fmt(row.get(CHANGED_FRACTION)),
        "ssim_outside": _fmt(row.get(SSIM_OUTSIDE)),
        "verdicts": [{"guard": g, "original": v.get("original", "–"), "edited": v.get("edited", "–"),
                      "wrong": v["wrong"]} for g, v in (verdicts or {}).items()],
    }


def _guard_rows(results: Mapping[str, Any], notes: Mapping[str, str]) -> list[dict[str, Any]]:
    rows = []
    for i, entry in enumerate(results.get("leaderboard") or []):
        spec = entry["guard"]
        m = results["guards"][spec]["metrics"]
        ci = m.get("ci") or {}
        cells = {k: {"value": _fmt(m.get(k)), "ci": _ci_text(ci.get(k), m.get("n_pairs", 0))}
                 for k in ("pair_accuracy", "f1", "balanced_accuracy", "recall", "specificity", "auroc",
                           "same_label_rate", "flip_detection_rate")}
        control = m.get("control") or {}
        remarks = dict.fromkeys([notes.get(spec, ""), *results["guards"][spec].get("warnings", [])])
        rows.append({"guard": spec, "color": PALETTE[i % len(PALETTE)], "note": " ".join(r for r in remarks if r),
                     "cells": cells,
                     "n_unknown": m.get("n_unknown", 0), "confusion": m.get("confusion", {}),
                     "control_unsafe": _fmt(control.get("unsafe_rate")), "control_n": control.get("n", 0),
                     "statuses": results["guards"][spec].get("statuses", {}),
                     "seconds": results["guards"][spec].get("seconds"),
                     "served": served_text(results["guards"][spec].get("usage")),
                     "similarity": m.get("similarity_correlation") or {}})
    return rows


SCORE_FROM = {"logprobs": "scores from the verdict token's logprobs",
              "text": "no logprobs: scores are the text verdict (no AUROC beyond it)",
              "both": "scores from logprobs where the server returned them, else the text verdict"}


def served_text(usage: Mapping[str, Any] | None) -> str:
    """One line on what a served guard sent and got (`usage.Usage.as_dict`) and where its scores came from;
    ``""`` for a guard that is not served."""
    if not usage:
        return ""
    p = [_fmt(usage.get(f"latency_p{q}_s"), 2) for q in (50, 90, 99)]
    line = (f"{usage['requests']} requests ({usage['retries']} retries, {usage['failures']} failed), "
            f"{usage['cache_hits']} cache hits, {usage['prompt_tokens']} + {usage['completion_tokens']} tokens, "
            f"latency p50/p90/p99 {'/'.join(p)} s")
    return f"{line}; {SCORE_FROM[usage['score_from']]}" if usage.get("score_from") else line


def _ci_text(ci: Sequence[float] | None, n_pairs: int) -> str:
    """An interval as text; one that collapses to a point on few pairs says so instead of looking certain."""
    if not ci:
        return ""
    if ci[0] == ci[1] and n_pairs < FEW_PAIRS:
        return f"{ci[0]:.2f}–{ci[1]:.2f}: no spread from {n_pairs} pairs, not certainty"
    return f"{ci[0]:.2f}–{ci[1]:.2f}"


def release_outcomes(n_pairs: int, rejected: Any) -> dict[str, Any]:
    """What became of a release's candidates: released pairs, and why the others were not (each reason with its
    count, its meaning in `statuses` and an example of the numbers behind it), from the ``rejected`` config.

    Args:
        n_pairs: the released pairs.
        rejected: the ``rejected`` config (a `datasets.Dataset`: only its reason columns are read), rows as
            mappings, or ``None`` for a release without it.

    Returns:
        ``{"released": n, "not_released": [{"reason", "n", "meaning", "example"}, ...]}`` (most common first).
    """
    if hasattr(rejected, "column_names"):
        rejected = rejected.select_columns([c for c in (REJECT_REASON, REJECT_DETAIL) if c in rejected.column_names])
    reasons: dict[str, dict[str, Any]] = {}
    for row in rejected if rejected is not None else []:
        reason = row.get(REJECT_REASON) or ST.NO_REASON
        cell = reasons.setdefault(reason, {"reason": reason, "n": 0, "meaning": ST.meaning(reason), "example": None})
        cell["n"] += 1
        cell["example"] = cell["example"] or row.get(REJECT_DETAIL)
    return {"released": n_pairs, "not_released": sorted(reasons.values(), key=lambda c: (-c["n"], c["reason"]))}


def _charts(results: Mapping[str, Any]) -> dict[str, str]:
    guards = [e["guard"] for e in results.get("leaderboard") or []]
    metrics = {g: results["guards"][g]["metrics"] for g in guards}
    cats = sorted({c for m in metrics.values() for c in m.get("per_category", {})})
    charts = {}
    if cats:
        series = {g: [metrics[g]["per_category"].get(c, {}).get("accuracy") for c in cats] for g in guards}
        charts["per_category"] = bar_chart_svg(cats, series, "accuracy per category")
        pair_series = {g: [metrics[g]["per_category"].get(c, {}).get("pair_accuracy") for c in cats] for g in guards}
        charts["per_category_pairs"] = bar_chart_svg(cats, pair_series, "pair accuracy per category")
    curves = {g: m["roc"] for g, m in metrics.items() if m.get("roc")}
    if curves:
        charts["roc"] = roc_svg(curves)
    return charts


def render_report(
    results: Mapping[str, Any] | None,
    out_path: str | Path,
    pairs: Iterable[Mapping[str, Any]] | None = None,
    funnel: Sequence[Mapping[str, Any]] | None = None,
    notes: Mapping[str, str] | None = None,
    title: str = "SafetyPairs report",
    sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write a self-contained HTML report (images inline, charts as inline SVG, no scripts).

    Args:
        results: the dict of `safetypairs.evaluate.stage.run_evaluate` (also written as
            ``results.json``); ``None`` for a report without guard metrics.
        out_path: the ``.html`` file to write (folders are created).
        pairs: rows of the ``pairs`` config (``pair_id, category, unsafe_image, safe_image,
            edit_mask, instruction, changed_fraction, ssim_outside``; images as PIL, bytes,
            paths or datasets dicts). Shown as a gallery (first 48) and used for the gallery of
            pairs most guards get wrong.
        funnel: pipeline stages, each ``{"stage", "rows_in", "rows_out", "statuses"}`` (and an
            optional ``"kept"`` when fewer rows go on than come out, e.g. accepted pairs).
        notes: a remark per guard spec shown next to its numbers, with ``results["notes"]`` (the
            circularity warnings `evaluate` records) and each guard's ``warnings`` (e.g. one that
            answered no image); ``results["warnings"]`` show at the top.
        title: the page title.
        sections: extra ``(title, trusted HTML)`` sections appended at the end (e.g. training curves).

    Returns:
        The written path.
    """
    import jinja2

    results = results or {}
    notes = {**(results.get("notes") or {}), **(notes or {})}
    rows = _rows(pairs)
    errors = _pair_errors(results)
    hard_ids = sorted((pid for pid, g in errors.items() if any(v["wrong"] for v in g.values())),
                      key=lambda pid: (-sum(v["wrong"] for v in errors[pid].values()), pid))[:MAX_HARD]
    by_id = {row.get(PAIR_ID): row for row in rows}
    shown = set(hard_ids)  # each pair once: the hardest above, the others in the gallery
    context = {
        "title": title,
        "results": results,
        "guards": _guard_rows(results, notes),
        "charts": _charts(results),
        "funnel": [dict(s, kept=s.get("kept", s.get("rows_out"))) for s in funnel or []],
        "funnel_svg": funnel_svg(funnel) if funnel else "",
        "hard": [_pair_card(by_id[pid], errors[pid]) for pid in hard_ids if pid in by_id],
        "n_hard": len([pid for pid, g in errors.items() if any(v["wrong"] for v in g.values())]),
        "gallery": [_pair_card(row, errors.get(row.get(PAIR_ID)))
                    for row in [r for r in rows if r.get(PAIR_ID) not in shown][:MAX_GALLERY]],
        "n_pairs": len(rows),
        "few_pairs": 0 < len(rows) < FEW_PAIRS,
        "unsafe": UNSAFE,
        "sections": list(sections),
        "results_json": json.dumps({k: results.get(k) for k in ("dataset", "policy", "config")}, default=str),
    }
    template = jinja2.Template(
        (resources.files("safetypairs") / "templates" / "report.html.jinja").read_text(encoding="utf-8"),
        autoescape=True, trim_blocks=True, lstrip_blocks=True,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(template.render(**context), encoding="utf-8")
    return out_path
