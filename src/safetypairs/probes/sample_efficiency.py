"""Claim (b), sample efficiency of counterfactual pairs: a linear probe on k base examples per class alone,
+ k pairs, + the same kind of pair images unpaired, + k random extra images per class.

Two effects answer two questions: *pair structure* = (+ k pairs) - (+ k unpaired pair images), where both
arms add k originals and k edits from the same pool and differ only in whether an original comes with its
own edit; *more data* = (+ k random extra images) - (base alone). Every interval combines the training
draws (seeds) with a bootstrap of the eval images clustered by source, and is clipped to the metric's range.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from safetypairs.identity import Exclusion, Identity, exclude_shared, merged_groups
from safetypairs.evaluate.metrics import weighted_auroc
from safetypairs.probes.probe import C_GRID, ProbeConfig, fit_probe
from safetypairs.utils import progress

logger = logging.getLogger(__name__)

ARMS = ("base", "pairs", "unpaired", "random")
ARM_LABELS = {
    "base": "k per class",
    "pairs": "+ k pairs",
    "unpaired": "+ k unpaired pair images",
    "random": "+ 2k random images",
}
# effect name -> (arm, minus arm, what the difference measures)
EFFECTS = {
    "pair_structure": ("pairs", "unpaired", "what pairing adds: k originals with their own edits vs k originals and "
                                            "k edits of other pairs"),
    "more_data": ("random", "base", "what 2k more natural images add"),
    "pairs_vs_random": ("pairs", "random", "k pairs vs 2k other natural images"),
    "pairs_vs_base": ("pairs", "base", "k pairs vs nothing added"),
}
METRICS = ("balanced_accuracy", "auroc", "accuracy")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Labelled:
    """Embedded rows: ``x`` ``(n, dim)``, ``y`` (1 = unsafe), who each row is, and its pair (pair images).

    Attributes:
        x: embeddings.
        y: labels, 1 = unsafe, 0 = safe.
        identity: source groups and pixel digests (`identity.Identity`).
        pair_ids: the pair each row belongs to (``None``: the identity's groups).
    """

    x: np.ndarray
    y: np.ndarray
    identity: Identity
    pair_ids: np.ndarray | None = None

    def take(self, index: np.ndarray) -> Labelled:
        """The rows at ``index``."""
        return Labelled(self.x[index], self.y[index], self.identity.take(index),
                        None if self.pair_ids is None else self.pair_ids[index])


@dataclass(frozen=True)
class SweepConfig:
    """The sweep: values of k, seeds, the probe's C selection and the intervals.

    Attributes:
        ks: base examples per class (and pairs, pair images or extra images per class added by the other arms).
        seeds: training draws per k (each draws new base, pair and extra samples).
        c_grid: C values tried on each fit's validation split.
        val_fraction: share of each training set's source groups held out to choose C and the threshold.
        metric: the metric plotted (all of `METRICS` are recorded).
        seed: the run seed every draw derives from.
        n_bootstrap: resamples of the eval sources behind every interval.
    """

    ks: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    seeds: int = 10
    c_grid: tuple[float, ...] = C_GRID
    val_fraction: float = 0.25
    metric: str = "balanced_accuracy"
    seed: int = 0
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"SweepConfig.ks must be positive integers, got {self.ks}")
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        if self.seeds < 2:
            raise ValueError(f"SweepConfig.seeds must be >= 2 (a CI needs two), got {self.seeds}")
        if self.metric not in METRICS:
            raise ValueError(f"SweepConfig.metric {self.metric!r} unknown; allowed: {', '.join(METRICS)}")
        if self.n_bootstrap < 100:
            raise ValueError(f"SweepConfig.n_bootstrap must be >= 100, got {self.n_bootstrap}")


def pair_index(pairs: Labelled) -> list[tuple[int, int]]:
    """``(unsafe row, safe row)`` of every pair holding both labels (first of each)."""
    found: dict[Any, dict[int, int]] = {}
    keys = pairs.identity.groups if pairs.pair_ids is None else pairs.pair_ids
    for i, (key, label) in enumerate(zip(keys, pairs.y)):
        found.setdefault(key, {}).setdefault(int(label), i)
    return [(rows[1], rows[0]) for rows in found.values() if 0 in rows and 1 in rows]


def _draw(base: Labelled, pairs: list[tuple[int, int]], k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of one (k, seed): k base rows per class, k extra base rows per class, k pairs, and for the
    unpaired arm the originals of those k pairs with the edits of k other pairs (never a twin together)."""
    chosen, extra = [], []
    for label in (0, 1):
        pool = rng.permutation(np.flatnonzero(base.y == label))
        chosen.append(pool[:k])
        extra.append(pool[k:2 * k])
    picked = rng.choice(len(pairs), size=2 * k, replace=False)
    own, other = picked[:k], picked[k:]
    return {"base": np.concatenate(chosen), "extra": np.concatenate(extra),
            "pairs": np.array([row for p in own for row in pairs[p]], dtype=np.int64),
            "unpaired": np.array([pairs[p][0] for p in own] + [pairs[p][1] for p in other], dtype=np.int64)}


def _shortage(base: Labelled, n_pairs: int, k: int) -> str | None:
    per_class = min(int((base.y == c).sum()) for c in (0, 1))
    if per_class < 2 * k:
        return f"the base set has {per_class} rows of its smaller class; k={k} needs {2 * k} (k + k extra)"
    if n_pairs < 2 * k:
        return f"only {n_pairs} complete pairs; k={k} needs {2 * k} (k pairs, and k more for the unpaired edits)"
    return None


def _check_eval(evaluation: Labelled, exclusion: Exclusion) -> None:
    classes = set(np.unique(evaluation.y).tolist())
    if classes != {0, 1}:
        have = "no rows" if not classes else f"only {'unsafe' if classes == {1} else 'safe'} rows"
        raise ValueError(f"the eval set has {have} after {exclusion.describe()}; give held-out images of both "
                         "classes that are neither in the base set nor in the pairs (--eval)")


@dataclass
class _Sweep:
    """One sweep's state: the training pool (base rows, then pair rows), the eval rows, and per (k, arm) the
    probes' P(unsafe) on the eval rows ``(seeds, n_eval)`` and thresholds ``(seeds,)``."""

    base: Labelled
    pool: Labelled
    complete: list[tuple[int, int]]
    evaluation: Labelled
    config: SweepConfig
    encoder: str
    p: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    thresholds: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def fit(self, k: int, seed: int) -> None:
        """Fit the four arms of one (k, seed) and score them on the eval rows."""
        offset, config = len(self.base.y), self.config
        rows = _draw(self.base, self.complete, k, np.random.default_rng([config.seed, k, seed]))
        sets = {"base": rows["base"], "pairs": np.r_[rows["base"], offset + rows["pairs"]],
                "unpaired": np.r_[rows["base"], offset + rows["unpaired"]],
                "random": np.r_[rows["base"], rows["extra"]]}
        probe_config = ProbeConfig(self.encoder, c_grid=config.c_grid, val_fraction=config.val_fraction,
                                   seed=config.seed * 100003 + seed)
        y = self.evaluation.y
        for arm in ARMS:
            train = self.pool.take(sets[arm])
            probe = fit_probe(train.x, train.y, probe_config, train.identity.groups)
            p = probe.predict_proba(self.evaluation.x)
            self.p.setdefault((k, arm), np.zeros((config.seeds, len(y))))[seed] = p
            self.thresholds.setdefault((k, arm), np.zeros(config.seeds))[seed] = probe.threshold
            point = {m: _metric_matrix(m, p[None], np.array([probe.threshold]), y, np.ones((1, len(y))))[0, 0]
                     for m in METRICS}
            self.runs.append({"k": k, "seed": seed, "arm": arm, "n_train": int(len(train.y)), "C": probe.meta["C"],
                              "threshold": probe.threshold, **{m: _json(v) for m, v in point.items()}})


def run_sweep(base: Labelled, pairs: Labelled, evaluation: Labelled, config: SweepConfig,
              encoder: str) -> dict[str, Any]:
    """Fit and score the four arms for every k and seed, and estimate the effects with intervals.

    In a (k, seed) every arm starts from the same k base examples per class. ``pairs`` adds k pairs
    (k unsafe originals + their k safe edits); ``unpaired`` adds the same k originals with the edits of
    k other pairs; ``random`` adds k more base images per class: every added arm adds 2k images. Each
    probe chooses C and its P(unsafe) threshold on a validation split of its own training rows, grouped
    by source. Eval rows that are, or share a source with, any base or pair-pool image are left out
    first (`identity.exclude_shared`).

    Args:
        base: the natural labelled pool.
        pairs: pair images (``pair_ids``; both labels per pair).
        evaluation: the held-out rows.
        config: the sweep.
        encoder: the encoder spec (recorded in each probe).

    Returns:
        ``{"config", "encoder", "n", "eval_exclusion", "skipped", "runs", "summary", "findings"}``;
        ``summary[metric]`` holds ``arms`` and ``effects`` (each ``{k: {mean, low, high, n}}``; effects
        also ``significant``).

    Raises:
        ValueError: when no k can run, or the eval rows lack a class once shared rows are left out.
    """
    exclusion = exclude_shared(evaluation.identity, base.identity, pairs.identity)
    logger.info("sample efficiency: %s", exclusion.describe())
    evaluation = evaluation.take(np.flatnonzero(exclusion.keep))
    _check_eval(evaluation, exclusion)
    complete = pair_index(pairs)
    skipped = {k: why for k in config.ks if (why := _shortage(base, len(complete), k))}
    ks = [k for k in config.ks if k not in skipped]
    if not ks:
        raise ValueError(f"no value of k can run: {'; '.join(skipped.values())}; use smaller --k values or more "
                         "base images / pairs")
    pool = Labelled(np.concatenate([base.x, pairs.x]), np.concatenate([base.y, pairs.y]),
                    Identity("train", merged_groups(base.identity, pairs.identity),
                             np.concatenate([base.identity.digests, pairs.identity.digests]),
                             np.concatenate([base.identity.ids, pairs.identity.ids])))
    sweep = _Sweep(base, pool, complete, evaluation, config, encoder)
    with threadpool_limits(1):  # hundreds of small fits: BLAS threads only contend
        for k, seed in progress([(k, s) for k in ks for s in range(config.seeds)], desc="sample efficiency"):
            sweep.fit(k, seed)
    summary = summarize(sweep, ks)
    return {"config": asdict(config), "encoder": encoder,
            "n": {"base": int(len(base.y)), "pairs": len(complete), "eval": int(len(evaluation.y)),
                  "eval_sources": int(len(set(evaluation.identity.groups)))},
            "eval_exclusion": {**exclusion.summary(), "sentence": exclusion.describe()},
            "skipped": {str(k): why for k, why in skipped.items()}, "runs": sweep.runs,
            "summary": summary, "findings": findings(summary, config.metric)}


def _json(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _metric_matrix(metric: str, p: np.ndarray, thresholds: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``metric`` of every seed's probabilities ``p`` ``(S, n)`` under every eval weighting ``w`` ``(B, n)``:
    ``(B, S)``. Balanced accuracy and accuracy use each probe's own threshold."""
    if metric == "auroc":
        return np.stack([weighted_auroc(p[s], y, w) for s in range(len(p))], axis=1)
    correct = ((p >= thresholds[:, None]) == (y == 1)[None]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "accuracy":
            return (w @ correct.T) / w.sum(axis=1, keepdims=True)
        pos = (y == 1).astype(np.float64)
        recall = (w @ (correct * pos).T) / (w @ pos)[:, None]
        specificity = (w @ (correct * (1 - pos)).T) / (w @ (1 - pos))[:, None]
    return (recall + specificity) / 2


def _cluster_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` row weights of a bootstrap that resamples whole source groups."""
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws]).astype(np.float64)
    return counts[:, inverse]


def _interval(values: np.ndarray, low: float, high: float) -> dict[str, Any]:
    """Mean over seeds of ``values`` ``(1 + B, S)`` (row 0: the eval set as it is; rows 1..B: eval sources
    resampled) with a 95% interval that adds the two sources of error: the seeds' spread (training draws,
    ``var / S``) and the eval sample's (the bootstrap variance of the seed mean), on a Student t with S - 1
    degrees of freedom, clipped to ``[low, high]``."""
    from scipy import stats

    point, n_seeds = values[0], values.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without one class: an all-NaN row
        means = np.nanmean(values[1:], axis=1) if len(values) > 1 else np.zeros(0)
    means = means[np.isfinite(means)]
    if not np.isfinite(point).all() or n_seeds < 2 or means.size < 2:
        return {"mean": _json(float(np.nanmean(point))), "low": None, "high": None, "n": n_seeds}
    error = math.sqrt(float(np.var(point, ddof=1)) / n_seeds + float(np.var(means, ddof=1)))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n_seeds - 1)) * error
    mean = float(np.mean(point))
    return {"mean": mean, "low": max(low, mean - half), "high": min(high, mean + half), "n": n_seeds}


def summarize(sweep: _Sweep, ks: list[int]) -> dict[str, Any]:
    """Per metric, arm and k the mean over seeds, and per effect the mean difference, each with a 95% CI.

    The interval (`_interval`) adds the spread over seeds (the training draws) to a bootstrap of the eval
    images clustered by source; the same resamples serve every arm, which pairs the arms in each
    difference. Intervals are clipped to [0, 1] (arms) and [-1, 1] (effects); an effect is significant
    when its interval excludes 0.
    """
    config, evaluation = sweep.config, sweep.evaluation
    rng = np.random.default_rng([config.seed, 7919])
    weights = np.vstack([np.ones((1, len(evaluation.y))),
                         _cluster_weights(evaluation.identity.groups, config.n_bootstrap, rng)])
    out: dict[str, Any] = {}
    for metric in METRICS:
        values = {(k, arm): _metric_matrix(metric, sweep.p[(k, arm)], sweep.thresholds[(k, arm)], evaluation.y, weights)
                  for k in ks for arm in ARMS}
        arms = {arm: {str(k): _interval(values[(k, arm)], 0.0, 1.0) for k in ks} for arm in ARMS}
        effects = {}
        for name, (arm, minus, _) in EFFECTS.items():
            effects[name] = {}
            for k in ks:
                cell = _interval(values[(k, arm)] - values[(k, minus)], -1.0, 1.0)
                cell["significant"] = cell["low"] is not None and (cell["low"] > 0 or cell["high"] < 0)
                effects[name][str(k)] = cell
        out[metric] = {"arms": arms, "effects": effects}
    return out


def verdict(cell: Mapping[str, Any]) -> str:
    """``"significantly positive"``, ``"significantly negative"`` or ``"not significant (the CI covers 0)"``."""
    if cell["low"] is None:
        return "no interval"
    if cell["low"] > 0:
        return "significantly positive"
    if cell["high"] < 0:
        return "significantly negative"
    return "not significant (the CI covers 0)"


def findings(summary: Mapping[str, Any], metric: str) -> list[str]:
    """The pair-structure and more-data effects in words, per k, for ``metric`` and AUROC."""
    lines = []
    for name in ("pair_structure", "more_data"):
        arm, minus, meaning = EFFECTS[name]
        for m in dict.fromkeys((metric, "auroc")):
            for k, cell in summary[m]["effects"][name].items():
                if cell["mean"] is None:
                    continue
                lines.append(f"{name.replace('_', ' ')} ({arm} - {minus}, {m}) at k={k}: {cell['mean']:+.3f} "
                             f"[{cell['low']:+.3f}, {cell['high']:+.3f}], {verdict(cell)}")
    return lines


def curve_svg(results: Mapping[str, Any], metric: str | None = None) -> str:
    """The arms' mean curves with 95% CI bands against k (log scale), as inline SVG."""
    import html

    from safetypairs.evaluate.report import PALETTE

    metric = metric or results["config"]["metric"]
    arms = results["summary"][metric]["arms"]
    ks = sorted(int(k) for k in arms["base"])
    width, height, left, right, top, bottom = 580, 300, 50, 200, 14, 40
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


COMPARISON_NOTE = (
    "What is compared with what: every arm starts from the same k base images per class in a draw. '+ k pairs' "
    "adds k originals with their own edits; '+ k unpaired pair images' adds the same originals with the "
    "edits of k other pairs, so pair structure = pairs - unpaired isolates the pairing itself; '+ 2k random "
    "images' adds k more base images per class, so more data = random - base is what any 2k images add. Each probe "
    "picks C and its threshold on a validation split of its own training rows. What is excluded: eval rows that "
    "are a base or pair-pool image, or share a source with one (equal pixel digests), are left out before scoring. "
    "Intervals: 95%, adding the spread over training draws (seeds) to a bootstrap of the eval images clustered by "
    "source (Student t, seeds - 1 degrees of freedom), clipped to the metric's range."
)


def report_html(results: Mapping[str, Any]) -> str:
    """A small self-contained HTML page: the curve (inline SVG), the arms and the effects with CIs, in words."""
    import html

    metric = results["config"]["metric"]
    summary = results["summary"][metric]

    def cell(c: Mapping[str, Any]) -> str:
        if c["mean"] is None:
            return "–"
        ci = "" if c["low"] is None else f" <small>[{c['low']:.3f}, {c['high']:.3f}]</small>"
        mark = " <b>*</b>" if c.get("significant") else ""
        return f"{c['mean']:.3f}{ci}{mark}"

    ks = sorted(summary["arms"]["base"], key=int)
    arm_head = "".join(f"<th>{html.escape(ARM_LABELS[a])}</th>" for a in ARMS)
    arm_rows = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{cell(summary['arms'][a][k])}</td>" for a in ARMS)
                       + "</tr>" for k in ks)
    effect_head = "".join(f"<th title='{html.escape(EFFECTS[e][2])}'>{html.escape(e.replace('_', ' '))}<br><small>"
                          f"{EFFECTS[e][0]} - {EFFECTS[e][1]}</small></th>" for e in EFFECTS)
    effect_rows = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{cell(summary['effects'][e][k])}</td>" for e in EFFECTS)
                          + "</tr>" for k in ks)
    words = "".join(f"<li>{html.escape(line)}</li>" for line in results.get("findings", []))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Sample efficiency</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}td,th{padding:4px 10px;text-align:right}"
            ".grid{stroke:#ddd}.frame{stroke:#888}.tick{font-size:11px}.axis{font-size:12px}</style></head><body>"
            f"<h1>Sample efficiency of counterfactual pairs</h1><p>Linear probe on "
            f"<code>{html.escape(results['encoder'])}</code>; {html.escape(metric)} on {results['n']['eval']} held-out "
            f"images from {results['n']['eval_sources']} sources; mean and 95% CI over {results['config']['seeds']} "
            f"seeds and the eval sources. {html.escape(results['eval_exclusion']['sentence'])}.</p>"
            f"<p>{html.escape(COMPARISON_NOTE)}</p>{curve_svg(results)}"
            f"<h2>Arms</h2><table><tr><th>k</th>{arm_head}</tr>{arm_rows}</table>"
            f"<h2>Effects</h2><p>* the 95% CI excludes 0.</p><table><tr><th>k</th>{effect_head}</tr>{effect_rows}</table>"
            f"<h2>In words</h2><ul>{words}</ul></body></html>")


def labelled(rows: Any, name: str) -> Labelled:
    """`Labelled` arrays of embedded rows (see `probe.embedded_arrays`); pair images keep their pair ids."""
    from safetypairs.probes.probe import embedded_arrays
    from safetypairs.schema import EMBED_STATUS, PAIR_ID
    from safetypairs.statuses import OK

    x, y, identity = embedded_arrays(rows, name)
    pair_ids = None
    if PAIR_ID in rows.column_names:
        ok = rows[EMBED_STATUS] if EMBED_STATUS in rows.column_names else [OK] * len(rows)
        pair_ids = np.array([p for p, status in zip(rows[PAIR_ID], ok) if status == OK], dtype=object)
    return Labelled(x, y, identity, pair_ids)


def run_sample_efficiency(base: Any, pairs: Any, evaluation: Any, config: SweepConfig, encoder: str,
                          out: str | Path | None = None) -> dict[str, Any]:
    """The sweep on embedded datasets; writes ``results.json``, ``curve.png`` and ``report.html`` into ``out``.

    Args:
        base: embedded natural labelled rows (``embedding``, ``label``; ``source_id`` and ``image_digest``
            say who each row is).
        pairs: an embedded release ``images`` config (originals and edits are used, controls left out).
        evaluation: embedded held-out rows; rows that are, or share a source with, a base or pair image are
            left out and counted.
        config: the sweep.
        encoder: the encoder spec that made the embeddings.
        out: the output folder, or ``None`` to write nothing.

    Returns:
        The results dict (see `run_sweep`).
    """
    from safetypairs.probes.probe import pair_rows

    results = run_sweep(labelled(base, "base"), labelled(pair_rows(pairs), "pairs"), labelled(evaluation, "eval"),
                        config, encoder)
    if out is not None:
        write_results(results, out)
    return results
