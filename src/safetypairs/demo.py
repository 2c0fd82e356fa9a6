"""``safetypairs demo``: the whole pipeline offline, with real models shipped in wheels.

The demo is the built-in recipe ``demo`` (`demo_recipe`), built by ``safetypairs build``'s steps in its output folder
(the command lives in ``cli/build.py``); this module holds the recipe's demo settings and what the demo adds after
the build (`finish_demo`): the training section, the report and ``results.json``, and the terminal summary."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.recipe import builtin
from safetypairs.utils import status_histogram

# The demo's settings are the built-in recipe `demo` (recipes/demo.yaml). Its judge and guards share rapidocr; the
# judge runs a more sensitive detector (lower box threshold, wider boxes) so that the evaluated `ocr-lexicon` guard is
# a different configuration, not the identical model (still not independent: evaluate adds the circularity note).
DEMO_RECIPE = builtin("demo")
DEMO_JUDGE = DEMO_RECIPE["validate"]["judge"]
DEMO_GUARDS = tuple(DEMO_RECIPE["evaluate"]["guard"])
# The training section: a linear probe on what rapidocr reads (no downloaded weights), four arms.
DEMO_ENCODER = "ocr-text:max_side=320"
DEMO_KS = (1, 2, 4, 8)
DEMO_SEEDS = 10
DEMO_EVAL_PER_CLASS = 12
TRAINING_NOTE = (
    "Base set: harassing memes (unsafe) and plain photos (safe), so 'has a caption' predicts the label there. "
    "Eval set: images no training set or pair holds: six other skimage images with held-out harassing or "
    "friendly captions (no caption string of the eval set appears in a source, an edit or the base set), so only "
    "the words tell the labels apart. Pairs add k demo pairs (original + its edit: same photo and caption box, "
    "different words); unpaired adds the same k originals with the edits of k other pairs; random adds k more "
    "base images per class. The ocr-text encoder sees only the text read from each image."
)
NUDENET_NOTE = (
    "NudeNet only detects nudity (O4); the demo pairs are O1 text overlays, so it is expected to call "
    "every image safe: its recall on unsafe images is ~0 and its pair accuracy ~0 by design."
)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``safetypairs demo``.

    Args:
        out: output folder: the build of `demo_recipe` (``generate/``, ``validate/``, ``release/``, ``evaluate/``),
            then ``training/``, ``report.html`` and ``results.json``.
        n: number of source photos.
        overwrite: replace a non-empty output folder.
        seed: seed for captions, styles, placement and edit seeds.
        n_bootstrap: bootstrap resamples for the guard metrics' confidence intervals.
        train: add the training section (probes on ``ocr-text`` embeddings: base, + pairs, + unpaired, + random).
    """

    out: str | Path
    n: int = 24
    overwrite: bool = False
    seed: int = 0
    n_bootstrap: int = 1000
    train: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n must be at least 1, got {self.n}")
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")


@dataclass
class DemoSummary:
    """What the demo did: per-stage rows and timings, the funnel and the guard metrics."""

    out: Path
    stages: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    sources: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    leaderboard: list[dict[str, Any]] = field(default_factory=list)
    training: list[str] = field(default_factory=list)

    def render(self) -> str:
        """A short plain-text summary for the terminal."""
        lines = [f"{'stage':<10} {'in':>5} {'out':>5} {'seconds':>8}  statuses"]
        for st in self.stages:
            statuses = ", ".join(f"{k}={v}" for k, v in st.get("statuses", {}).items())
            lines.append(f"{st['stage']:<10} {st['rows_in']:>5} {st['rows_out']:>5} {st['seconds']:>8.1f}  {statuses}")
        rate = self.accepted / self.sources if self.sources else 0.0
        reasons = ", ".join(f"{k}={v}" for k, v in self.reject_reasons.items()) or "none"
        lines.append(f"accepted pairs: {self.accepted}/{self.sources} ({rate:.0%}); rejected: {reasons}")
        for row in self.leaderboard:
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"guard {row['guard']:<44} pair_acc={fmt(row.get('pair_accuracy'))} "
                         f"f1={fmt(row.get('f1'))} bal_acc={fmt(row.get('balanced_accuracy'))}")
        lines += [f"probe ({DEMO_ENCODER}) {line}" for line in self.training]
        lines.append(f"wrote {self.out / 'release'}, {self.out / 'report.html'}, {self.out / 'results.json'}")
        return "\n".join(lines)


def demo_recipe(config: DemoConfig) -> dict[str, Any]:
    """The built-in recipe ``demo`` at ``config``'s size, seed and bootstrap resamples (a mapping for
    `recipe.from_mapping`): what ``safetypairs demo`` builds, stage by stage, in its output folder."""
    recipe = copy.deepcopy(DEMO_RECIPE)
    recipe["generate"].update(source=f"demo:{config.n}", seed=config.seed)
    recipe["evaluate"].update(bootstrap=config.n_bootstrap, seed=config.seed)
    return recipe


def finish_demo(config: DemoConfig, out: Path) -> DemoSummary:
    """The demo's own part after the build of `demo_recipe` in ``out`` (``generate/``, ``validate/``, ``release/``,
    ``evaluate/``): the training section, ``report.html`` and ``results.json`` over what the stages wrote.

    Args:
        config: the demo settings.
        out: the build folder.

    Returns:
        The run summary.
    """
    from safetypairs.engine.datafiles import load_release, read_rows
    from safetypairs.evaluate.report import render_report

    runs = {stage: json.loads((out / stage / "run.json").read_text()) for stage in ("generate", "validate")}
    candidates = read_rows(out / "validate")
    images, pairs = (load_release(str(out / "release"), name, "auto") for name in ("images", "pairs"))
    evaluation = json.loads((out / "evaluate" / "results.json").read_text())
    stages = _stages(runs, len(pairs), len(images))
    funnel = _funnel(stages, candidates)
    training, sections = {}, []
    if config.train:
        start = time.perf_counter()
        training = _training(images, config, out / "training")
        stages.append({"stage": "train", "rows_in": len(images), "rows_out": len(images),
                       "seconds": round(time.perf_counter() - start, 2),
                       "statuses": {"runs": len(training.get("runs", [])),
                                    **({"skipped": 1} if "skipped_all" in training else {})}})
        sections = [("Training: sample efficiency of pairs", _training_html(training))]
    notes = {**evaluation.get("notes", {}), "nudenet": NUDENET_NOTE}
    summary = DemoSummary(out=out, stages=stages, accepted=len(pairs), sources=config.n,
                          reject_reasons=_reject_reasons(candidates), leaderboard=evaluation.get("leaderboard", []),
                          training=_training_lines(training))
    results = {
        "demo": {**asdict(config), "out": str(out), "judge": DEMO_JUDGE, "guards": list(DEMO_GUARDS)},
        "stages": stages,
        "funnel": funnel,
        "accepted_pairs": summary.accepted,
        "acceptance_rate": summary.accepted / config.n,
        "reject_reasons": summary.reject_reasons,
        "metrics_ran": sorted({m for row in candidates[S.METRICS_RAN] for m in (row or [])}),
        "training": {k: v for k, v in training.items() if k != "runs"},
        **evaluation,
        "notes": notes,
    }
    render_report(results, out / "report.html", pairs=pairs, funnel=funnel, notes=notes, sections=sections)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return summary


def _stages(runs: dict[str, dict[str, Any]], n_pairs: int, n_images: int) -> list[dict[str, Any]]:
    """Rows, statuses and seconds per step, from the generate and validate run folders' ``run.json``."""
    generate, validate = runs["generate"], runs["validate"]
    seconds = {stage: run["timings"].get("wall_seconds_last_run", 0.0) for stage, run in runs.items()}
    steps = [{"stage": "source", "rows_in": generate["rows_in"], "rows_out": generate["rows_in"], "seconds": 0.0,
              "statuses": {ST.OK: generate["rows_in"]}}]
    for name in ("instruct", "edit"):  # generate's two steps (the demo's one candidate per source)
        steps.append({"stage": name, "rows_in": generate["rows_in"], "rows_out": generate["rows_out"],
                      "seconds": seconds["generate"] if name == "edit" else 0.0,
                      "statuses": generate["statuses"][name]})
    steps.append({"stage": "validate", "rows_in": validate["rows_in"], "rows_out": validate["rows_out"],
                  "seconds": seconds["validate"], "statuses": validate["statuses"]["decision"]})
    steps.append({"stage": "release", "rows_in": validate["rows_out"], "rows_out": n_pairs, "seconds": 0.0,
                  "statuses": {"pairs": n_pairs, "images": n_images}})
    return steps


def _reject_reasons(candidates: Any, edited_only: bool = False) -> dict[str, int]:
    """Rejection reasons of the rows not accepted (only those whose edit succeeded, with ``edited_only``)."""
    rows = zip(candidates[S.REJECT_REASON], candidates[S.ACCEPTED], candidates[S.EDIT_STATUS])
    return status_histogram(r for r, ok, edit in rows if not ok and (edit == ST.OK or not edited_only))


def _funnel(stages: list[dict[str, Any]], validated: Any) -> list[dict[str, Any]]:
    """sources -> instructed -> edited -> accepted; each step's statuses cover the rows that entered it."""
    accepted = sum(bool(a) for a in validated[S.ACCEPTED])
    by_name = {st["stage"]: st for st in stages}
    ok = lambda name: by_name[name]["statuses"].get(ST.OK, 0)  # noqa: E731
    return [
        {"stage": "sources", "rows_in": by_name["source"]["rows_in"], "rows_out": by_name["source"]["rows_out"],
         "statuses": by_name["source"]["statuses"]},
        {"stage": "instructed", "rows_in": by_name["instruct"]["rows_in"], "rows_out": ok("instruct"),
         "statuses": by_name["instruct"]["statuses"]},
        {"stage": "edited", "rows_in": ok("instruct"), "rows_out": ok("edit"),
         "statuses": {k: v for k, v in by_name["edit"]["statuses"].items() if k != ST.NOT_INSTRUCTED}},
        {"stage": "accepted", "rows_in": ok("edit"), "rows_out": accepted,
         "statuses": _reject_reasons(validated, edited_only=True)},
    ]


def _captioned_rows(n_per_class: int, seed: int, safe: str, prefix: str, heldout: bool = False) -> Any:
    """Unsafe harassing memes and safe images (``plain`` photos or ``benign`` captions); each row's source id
    names its photo, so the rows of one photo form one source. ``heldout``: `sources.HELDOUT_PHOTOS` and
    held-out captions only."""
    from datasets import ClassLabel, Dataset, Features, Image, Value

    from safetypairs.sources import DEMO_PHOTOS, demo_photo, render_demo_row

    rows = []
    for i in range(n_per_class):
        unsafe = render_demo_row(i, seed, heldout=heldout)
        if safe == "benign":
            negative = render_demo_row(i, seed, "benign", heldout=heldout)
            photo = json.loads(negative[S.SOURCE_META])["photo"]
            negative = negative[S.IMAGE]
        else:
            photo = DEMO_PHOTOS[(i + 5) % len(DEMO_PHOTOS)]
            negative = demo_photo(photo)
        rows += [{S.IMAGE: unsafe[S.IMAGE], S.LABEL: 1,
                  S.SOURCE_ID: f"{prefix}-{json.loads(unsafe[S.SOURCE_META])['photo']}"},
                 {S.IMAGE: negative, S.LABEL: 0, S.SOURCE_ID: f"{prefix}-{photo}"}]
    features = Features({S.IMAGE: Image(), S.LABEL: ClassLabel(names=S.LABELS), S.SOURCE_ID: Value("string")})
    return Dataset.from_list(rows, features=features)


def _training(images: Any, config: DemoConfig, out: Path) -> dict[str, Any]:
    """The four arms' curves on the demo's O1 data with the offline ``ocr-text`` encoder, scored on held-out images."""
    from safetypairs.probes.embed import EmbedConfig, run_embed
    from safetypairs.probes.probe import pair_rows
    from safetypairs.probes.sample_efficiency import SweepConfig, run_sample_efficiency

    pair_images = pair_rows(images)
    n_pairs = len(set(pair_images[S.PAIR_ID]))
    ks = tuple(k for k in DEMO_KS if 2 * k <= n_pairs)
    if not ks:
        return {"skipped_all": f"{n_pairs} accepted pairs: too few for a probe (k=1 needs 2)"}
    embed = EmbedConfig(encoder=DEMO_ENCODER)
    base = _captioned_rows(2 * max(ks), config.seed + 1, "plain", "train-base")
    evaluation = _captioned_rows(DEMO_EVAL_PER_CLASS, config.seed + 2, "benign", "train-eval", heldout=True)
    return run_sample_efficiency(run_embed(base, embed)[0], run_embed(pair_images, embed)[0],
                                 run_embed(evaluation, embed)[0],
                                 SweepConfig(ks=ks, seeds=DEMO_SEEDS, seed=config.seed,
                                             n_bootstrap=max(config.n_bootstrap, 100)),
                                 DEMO_ENCODER, out=out)


def _training_lines(training: dict[str, Any]) -> list[str]:
    """The training section for the terminal: the skip reason, or the eval set and, per k, the pair-structure and
    more-data effects on balanced accuracy (every metric's sentences are in the report and results.json)."""
    if not training:
        return []
    if "skipped_all" in training:
        return [f"training skipped: {training['skipped_all']}"]

    def cell(c: dict[str, Any]) -> str:
        sign = "*" if c["significant"] else " (n.s.)"
        return f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]{sign}"

    effects = training["summary"]["balanced_accuracy"]["effects"]
    return [f"eval: {training['eval_exclusion']['sentence']}"] + [
        f"k={k}: balanced accuracy, pair structure (pairs - unpaired) {cell(effects['pair_structure'][k])}; "
        f"more data (random - base) {cell(effects['more_data'][k])}" for k in effects["pair_structure"]]


def _training_html(training: dict[str, Any]) -> str:
    import html

    from safetypairs.probes.sample_efficiency import COMPARISON_NOTE, curve_svg

    if "skipped_all" in training:
        return f"<p class='muted'>Skipped: {html.escape(training['skipped_all'])}</p>"
    n = training["n"]
    words = "".join(f"<li>{html.escape(line)}</li>" for line in training["findings"])
    return (f"<p class='muted small'>{html.escape(TRAINING_NOTE)} Base pool {n['base']} images, {n['pairs']} pairs, "
            f"{n['eval']} eval images from {n['eval_sources']} sources "
            f"({html.escape(training['eval_exclusion']['sentence'])}); mean and 95% CI over "
            f"{training['config']['seeds']} seeds and the eval sources. Files: training/results.json, "
            f"training/curve.png, training/report.html.</p>"
            f"<p class='muted small'>{html.escape(COMPARISON_NOTE)}</p>{curve_svg(training)}<ul>{words}</ul>")
