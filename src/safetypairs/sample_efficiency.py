"""Sample efficiency of counterfactual pairs: k base examples per class alone, + k pairs, + k random extra images."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safetypairs.probe import C_GRID, ProbeConfig, fit_probe
from safetypairs.utils import progress

logger = logging.getLogger(__name__)

ARMS = ("base", "pairs", "random")
ARM_LABELS = {"base": "k per class", "pairs": "+ k pairs", "random": "+ k random extra images"}
METRICS = ("balanced_accuracy", "accuracy", "auroc")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Labelled:
    """Embedded rows: ``x`` ``(n, dim)``, ``y`` (1 = unsafe), ``groups`` (source or pair id per row)."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray

    def take(self, index: np.ndarray) -> Labelled:
        """The rows at ``index``."""
        return Labelled(self.x[index], self.y[index], self.groups[index])


@dataclass(frozen=True)
class SweepConfig:
    """The sweep: values of k, seeds, and the probe's C selection.

    Attributes:
        ks: base examples per class (and pairs / extra images per class added by the other arms).
        seeds: repetitions per k (each draws new base, pair and extra samples).
        c_grid: C values tried on each fit's validation split.
        val_fraction: share of each training set's groups held out to choose C.
        metric: the metric plotted (all of `METRICS` are recorded).
        seed: the run seed every draw derives from.
    """

    ks: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    seeds: int = 10
    c_grid: tuple[float, ...] = C_GRID
    val_fraction: float = 0.25
    metric: str = "balanced_accuracy"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"SweepConfig.ks must be positive integers, got {self.ks}")
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        if self.seeds < 2:
            raise ValueError(f"SweepConfig.seeds must be >= 2 (a CI needs two), got {self.seeds}")
        if self.metric not in METRICS:
            raise ValueError(f"SweepConfig.metric {self.metric!r} unknown; allowed: {', '.join(METRICS)}")


def pair_index(pairs: Labelled) -> list[tuple[int, int]]:
    """``(unsafe row, safe row)`` of every pair id holding both labels (first of each)."""
    found: dict[Any, dict[int, int]] = {}
    for i, (group, label) in enumerate(zip(pairs.groups, pairs.y)):
        found.setdefault(group, {}).setdefault(int(label), i)
    return [(rows[1], rows[0]) for rows in found.values() if 0 in rows and 1 in rows]


def disjoint_eval(evaluation: Labelled, *training: Labelled) -> tuple[Labelled, int]:
    """The eval rows whose source group appears in no training set, and how many were dropped."""
    used = set().union(*(set(t.groups.tolist()) for t in training))
    keep = np.array([g not in used for g in evaluation.groups], dtype=bool)
    return evaluation.take(np.flatnonzero(keep)), int((~keep).sum())


def _scores(probe: Any, evaluation: Labelled) -> dict[str, float | None]:
    from sklearn.metrics import roc_auc_score

    p = probe.predict_proba(evaluation.x)
    pred = (p >= 0.5).astype(np.int64)
    y = evaluation.y
    both = len(np.unique(y)) == 2
    return {
        "balanced_accuracy": float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])),
        "accuracy": float(np.mean(pred == y)),
        "auroc": float(roc_auc_score(y, p)) if both else None,
    }


def _draw(base: Labelled, pairs: list[tuple[int, int]], k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The base rows (k per class), the k pairs' rows and k extra base rows per class for one seed."""
    chosen, extra = [], []
    for label in (0, 1):
        pool = rng.permutation(np.flatnonzero(base.y == label))
        chosen.append(pool[:k])
        extra.append(pool[k:2 * k])
    picked = rng.choice(len(pairs), size=k, replace=False)
    return {"base": np.concatenate(chosen), "extra": np.concatenate(extra),
            "pairs": np.array([row for p in picked for row in pairs[p]], dtype=np.int64)}


def _shortage(base: Labelled, n_pairs: int, k: int) -> str | None:
    per_class = min(int((base.y == c).sum()) for c in (0, 1))
    if per_class < 2 * k:
        return f"the base set has {per_class} rows of its smaller class; k={k} needs {2 * k} (k + k extra)"
    if n_pairs < k:
        return f"only {n_pairs} complete pairs; k={k} needs {k}"
    return None


def _stack(*parts: Labelled) -> Labelled:
    return Labelled(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                    np.concatenate([p.groups for p in parts]))


def run_sweep(base: Labelled, pairs: Labelled, evaluation: Labelled, config: SweepConfig,
              encoder: str) -> dict[str, Any]:
    """Fit and score the three arms for every k and seed.

    The same k base examples per class go into every arm of a (k, seed); the pair arm adds k
    counterfactual pairs (k unsafe + k safe images), the random arm adds k more base images per
    class, so both add 2k images and only the pair arm adds counterfactual structure. Eval rows
    that share a source group with any training row are dropped first.

    Args:
        base: the natural labelled pool.
        pairs: pair images (groups = pair ids; both labels per pair).
        evaluation: the held-out rows.
        config: the sweep.
        encoder: the encoder spec (recorded in each probe).

    Returns:
        ``{"config", "encoder", "n", "skipped", "runs": [{k, seed, arm, C, <metrics>}], "summary"}``.

    Raises:
        ValueError: when no k can run or the eval rows lack a class.
    """
    evaluation, dropped = disjoint_eval(evaluation, base, pairs)
    if len(np.unique(evaluation.y)) != 2:
        raise ValueError(f"the eval set needs safe and unsafe rows after removing {dropped} rows that share a "
                         "source with training")
    complete = pair_index(pairs)
    skipped = {k: why for k in config.ks if (why := _shortage(base, len(complete), k))}
    ks = [k for k in config.ks if k not in skipped]
    if not ks:
        raise ValueError(f"no value of k can run: {skipped}")
    runs = []
    for k, seed in progress([(k, s) for k in ks for s in range(config.seeds)], desc="sample efficiency"):
        rows = _draw(base, complete, k, np.random.default_rng([config.seed, k, seed]))
        core = base.take(rows["base"])
        sets = {"base": core, "pairs": _stack(core, pairs.take(rows["pairs"])),
                "random": _stack(core, base.take(rows["extra"]))}
        probe_config = ProbeConfig(encoder, c_grid=config.c_grid, val_fraction=config.val_fraction,
                                   seed=config.seed * 100003 + seed)
        for arm in ARMS:
            probe = fit_probe(sets[arm].x, sets[arm].y, probe_config, sets[arm].groups)
            runs.append({"k": k, "seed": seed, "arm": arm, "n_train": int(len(sets[arm].y)), "C": probe.meta["C"],
                         **_scores(probe, evaluation)})
    return {"config": asdict(config), "encoder": encoder,
            "n": {"base": int(len(base.y)), "pairs": len(complete), "eval": int(len(evaluation.y)),
                  "eval_dropped_shared_source": dropped},
            "skipped": {str(k): why for k, why in skipped.items()}, "runs": runs,
            "summary": summarize(runs, ks)}


def mean_ci(values: list[float]) -> dict[str, float | int | None]:
    """Mean and the 95% Student-t interval of the mean (over seeds)."""
    from scipy import stats

    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not arr.size:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(arr.mean())
    if arr.size < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(arr.size)}


def summarize(runs: list[Mapping[str, Any]], ks: list[int]) -> dict[str, Any]:
    """Per metric, arm and k: mean and 95% CI over seeds; per k, the paired gain of each added arm over ``base``."""
    table: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for run in runs:
        table.setdefault((run["arm"], run["k"]), {})[run["seed"]] = run
    out: dict[str, Any] = {}
    for metric in METRICS:
        arms = {arm: {str(k): mean_ci([r[metric] for r in table[(arm, k)].values()]) for k in ks} for arm in ARMS}
        gains = {arm: {str(k): mean_ci([table[(arm, k)][s][metric] - table[("base", k)][s][metric]
                                        for s in table[("base", k)]
                                        if table[(arm, k)][s][metric] is not None
                                        and table[("base", k)][s][metric] is not None]) for k in ks}
                 for arm in ARMS[1:]}
        out[metric] = {"arms": arms, "gain_over_base": gains}
    return out


def curve_svg(results: Mapping[str, Any], metric: str | None = None) -> str:
    """The three arms' mean curves with 95% CI bands against k (log scale), as inline SVG."""
    import html

    from safetypairs.report import PALETTE

    metric = metric or results["config"]["metric"]
    arms = results["summary"][metric]["arms"]
    ks = sorted(int(k) for k in arms["base"])
    width, height, left, right, top, bottom = 520, 300, 50, 150, 14, 40
    span_x, span_y = width - left - right, height - top - bottom
    lo_k, hi_k = math.log2(ks[0]), math.log2(ks[-1]) if len(ks) > 1 else math.log2(ks[0]) + 1
    values = [v for arm in arms.values() for c in arm.values() for v in (c["low"], c["high"], c["mean"])
              if v is not None]
    y0, y1 = min(values + [0.5]), max(values + [1.0])

    def x(k: int) -> float:
        return left + span_x * (math.log2(k) - lo_k) / max(hi_k - lo_k, 1e-9)

    def y(v: float) -> float:
        return top + span_y * (1 - (v - y0) / max(y1 - y0, 1e-9))

    parts = [f'<svg viewBox="0 0 {width} {height}" class="chart" role="img" aria-label="{html.escape(metric)} vs k">',
             f'<rect x="{left}" y="{top}" width="{span_x}" height="{span_y}" class="frame" fill="none"/>']
    for k in ks:
        parts.append(f'<text x="{x(k):.1f}" y="{height - bottom + 16}" class="tick" text-anchor="middle">{k}</text>')
    for tick in np.linspace(y0, y1, 5):
        parts.append(f'<line x1="{left}" x2="{left + span_x}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" class="tick" text-anchor="end">{tick:.2f}</text>')
    parts.append(f'<text x="{left + span_x / 2}" y="{height - 6}" class="axis" text-anchor="middle">'
                 f"k (examples per class)</text>")
    for i, arm in enumerate(ARMS):
        color, cells = PALETTE[i], [(k, arms[arm][str(k)]) for k in ks if arms[arm][str(k)]["mean"] is not None]
        band = [(k, c) for k, c in cells if c["low"] is not None]
        if band:
            points = [f"{x(k):.1f},{y(c['high']):.1f}" for k, c in band] + \
                     [f"{x(k):.1f},{y(c['low']):.1f}" for k, c in reversed(band)]
            parts.append(f'<polygon points="{" ".join(points)}" fill="{color}" fill-opacity="0.15" stroke="none"/>')
        line = " ".join(f"{x(k):.1f},{y(c['mean']):.1f}" for k, c in cells)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2">'
                     f"<title>{html.escape(ARM_LABELS[arm])}</title></polyline>")
        parts.append(f'<text x="{left + span_x + 8}" y="{top + 16 + 18 * i}" class="tick" fill="{color}">'
                     f"{html.escape(ARM_LABELS[arm])}</text>")
    parts.append("</svg>")
    return "".join(parts)


def plot_png(results: Mapping[str, Any], path: str | Path, metric: str | None = None) -> Path:
    """The same curves as `curve_svg`, drawn with matplotlib into a PNG.

    A bare `matplotlib.figure.Figure` (no pyplot): the caller's backend, e.g. a notebook's inline
    one, is left alone.
    """
    from matplotlib.figure import Figure

    metric = metric or results["config"]["metric"]
    arms = results["summary"][metric]["arms"]
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for arm in ARMS:
        cells = sorted((int(k), c) for k, c in arms[arm].items() if c["mean"] is not None)
        ks = [k for k, _ in cells]
        ax.plot(ks, [c["mean"] for _, c in cells], marker="o", label=ARM_LABELS[arm])
        band = [(k, c) for k, c in cells if c["low"] is not None]
        ax.fill_between([k for k, _ in band], [c["low"] for _, c in band], [c["high"] for _, c in band], alpha=0.2)
    ax.set_xscale("log", base=2)
    ticks = sorted(int(k) for k in arms["base"])
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set_xlabel("k (examples per class)")
    ax.set_ylabel(f"{metric} on held-out images")
    ax.set_title(f"probe on {results['encoder']}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def write_results(results: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``curve.png`` and ``report.html`` (the curve inline as SVG) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "png": out / "curve.png", "html": out / "report.html"}
    paths["results"].write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    plot_png(results, paths["png"])
    paths["html"].write_text(report_html(results), encoding="utf-8")
    return paths


def report_html(results: Mapping[str, Any]) -> str:
    """A small self-contained HTML page: the curve (inline SVG) and a table of means with CIs and gains."""
    import html

    metric = results["config"]["metric"]
    summary = results["summary"][metric]

    def cell(c: Mapping[str, Any]) -> str:
        if c["mean"] is None:
            return "–"
        ci = "" if c["low"] is None else f" <small>[{c['low']:.3f}, {c['high']:.3f}]</small>"
        return f"{c['mean']:.3f}{ci}"

    ks = sorted(summary["arms"]["base"], key=int)
    head = "".join(f"<th>{html.escape(ARM_LABELS[a])}</th>" for a in ARMS)
    head += "".join(f"<th>gain {html.escape(ARM_LABELS[a])}</th>" for a in ARMS[1:])
    rows = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{cell(summary['arms'][a][k])}</td>" for a in ARMS)
                   + "".join(f"<td>{cell(summary['gain_over_base'][a][k])}</td>" for a in ARMS[1:]) + "</tr>"
                   for k in ks)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Sample efficiency</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}td,th{padding:4px 10px;text-align:right}"
            ".grid{stroke:#ddd}.frame{stroke:#888}.tick{font-size:11px}.axis{font-size:12px}</style></head><body>"
            f"<h1>Sample efficiency of counterfactual pairs</h1><p>Linear probe on "
            f"<code>{html.escape(results['encoder'])}</code>; {html.escape(metric)} on {results['n']['eval']} held-out "
            f"images; mean and 95% CI over {results['config']['seeds']} seeds.</p>{curve_svg(results)}"
            f"<table><tr><th>k</th>{head}</tr>{rows}</table></body></html>")


def labelled(rows: Any, name: str) -> Labelled:
    """`Labelled` arrays of embedded rows (see `probe.embedded_arrays`)."""
    from safetypairs.probe import embedded_arrays

    return Labelled(*embedded_arrays(rows, name))


def run_sample_efficiency(base: Any, pairs: Any, evaluation: Any, config: SweepConfig, encoder: str,
                          out: str | Path | None = None) -> dict[str, Any]:
    """The sweep on embedded datasets; writes ``results.json``, ``curve.png`` and ``report.html`` into ``out``.

    Args:
        base: embedded natural labelled rows (``embedding``, ``label``; ``source_id`` groups rows).
        pairs: an embedded release ``images`` config (originals and edits are used, controls left out).
        evaluation: embedded held-out rows; rows sharing a source with training are dropped.
        config: the sweep.
        encoder: the encoder spec that made the embeddings.
        out: the output folder, or ``None`` to write nothing.

    Returns:
        The results dict (see `run_sweep`).
    """
    from safetypairs.probe import pair_rows

    results = run_sweep(labelled(base, "base"), labelled(pair_rows(pairs), "pairs"), labelled(evaluation, "eval"),
                        config, encoder)
    if out is not None:
        write_results(results, out)
    return results
