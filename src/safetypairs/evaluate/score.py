"""``safetypairs score``: score predictions made elsewhere (a csv/jsonl/parquet file keyed by image id) like `evaluate`."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.engine.datafiles import load_release
from safetypairs.engine.folders import atomic_dir
from safetypairs.evaluate.metrics import label_names
from safetypairs.policy import Policy, load_policy
from safetypairs.engine.runner import content_fingerprint
from safetypairs.evaluate.scoring import guard_columns, score_predictions

logger = logging.getLogger(__name__)

READERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class ScoreConfig:
    """How to read a predictions file and score it.

    Attributes:
        name: the guard's name in results and the report (default: ``file:<file name>``).
        id_column: the column naming each image (the release's ``image_id``: ``<pair_id>-<role>``).
        prediction_column: ``safe``/``unsafe`` (any case), 0/1 or booleans (True = unsafe); anything
            else counts as an unknown answer (an error).
        score_column: optional, higher = more unsafe (AUROC and ROC); ignored when absent.
        policy: the policy id recorded in the results.
        n_bootstrap: bootstrap resamples over pairs for the CIs (0 turns them off).
        seed: bootstrap seed.
        allow_missing: score a file that has no row for some images (each counts as an error); by default
            such a file is refused, naming the images.
    """

    name: str = ""
    id_column: str = S.IMAGE_ID
    prediction_column: str = "prediction"
    score_column: str = "score"
    policy: str | Policy = "llavaguard"
    n_bootstrap: int = 1000
    seed: int = 0
    allow_missing: bool = False

    def __post_init__(self) -> None:
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")
        load_policy(self.policy)

    @property
    def guards(self) -> tuple[str, ...]:
        """The one scored "guard": the file's name (what `scoring.score_predictions` reads)."""
        return (self.name,)


def read_predictions(path: str | Path, config: ScoreConfig) -> dict[str, tuple[Any, float | None]]:
    """Read a predictions file: image id -> (prediction, score or ``None``).

    Raises:
        ValueError: for an unknown file type, missing columns or an image id given twice.
        FileNotFoundError: when the file does not exist.
    """
    path = Path(path)
    if path.suffix.lower() not in READERS:
        raise ValueError(f"predictions file {str(path)!r}: unknown type; allowed: {', '.join(READERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {str(path)!r} does not exist")
    frame = _read_frame(path)
    columns = [str(c) for c in frame.columns]
    missing = [c for c in (config.id_column, config.prediction_column) if c not in columns]
    if missing:
        raise ValueError(f"predictions file {str(path)!r} lacks column(s) {missing}; columns: "
                         f"{', '.join(columns)} (name them with --id-column / --prediction-column)")
    ids = [str(v) for v in frame[config.id_column].tolist()]
    repeated = [k for k, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(f"predictions file {str(path)!r} names image(s) {repeated[:5]} more than once")
    scores = frame[config.score_column].tolist() if config.score_column in columns else [None] * len(ids)
    return dict(zip(ids, zip(frame[config.prediction_column].tolist(), scores)))


def _read_frame(path: Path) -> Any:
    import pandas as pd

    kind = READERS[path.suffix.lower()]
    if kind == "csv":
        return pd.read_csv(path, dtype={0: str}, keep_default_na=False, na_values=[""])
    if kind == "parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=path.suffix.lower() == ".jsonl", dtype=False)


def _score(value: Any) -> float | None:
    """A score cell as a number; ``None`` when it is empty or cannot be read (``"n/a"``, a list...)."""
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _named(ids: list[str]) -> dict[str, Any]:
    return {"n": len(ids), "first": ids[:5]}


def _problems(ids: list[str], table: dict[str, list], found: list[Any], cols: dict[str, str]) -> dict[str, Any]:
    """The file's missing, unparsable and unreadable-score images, each counted with the first few ids."""
    raw_scores = [None if f is None else f[1] for f in found]
    return {
        "missing": _named([i for i, f in zip(ids, found) if f is None]),
        "unparsable": _named([i for i, s in zip(ids, table[cols["status"]]) if s == ST.UNPARSABLE]),
        "unreadable_scores": _named([i for i, s, v in zip(ids, table[cols["score"]], raw_scores)
                                     if s is None and v is not None and not _empty(v)]),
    }


def _empty(value: Any) -> bool:
    return (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value))


def prediction_table(images: Dataset, predictions: dict[str, tuple[Any, Any]], name: str
                     ) -> tuple[dict[str, list], dict[str, Any]]:
    """The release's labels joined with the file's predictions, in `evaluate.stage.predict`'s column layout, and
    the file's problems: images with no row (``missing``), predictions that are not a label (``unparsable``) and
    scores that are not numbers (``unreadable_scores``), each ``{"n", "first"}`` (a missing or unreadable cell
    becomes an unknown prediction or no score, never an error).

    Raises:
        ValueError: when the file names images the release does not have (another split or release).
    """
    keep = [S.LABEL, S.CATEGORY, S.PAIR_ID, S.ROLE]
    table = images.select_columns(keep + [c for c in (S.IMAGE_ID,) if c in images.column_names]).to_dict()
    ids = table.get(S.IMAGE_ID) or [S.image_id(p, r) for p, r in zip(table[S.PAIR_ID], S.role_names(table[S.ROLE]))]
    unknown = sorted(set(predictions) - set(ids))
    if unknown:
        raise ValueError(f"{len(unknown)} predicted image id(s) are not in this release split, e.g. {unknown[:3]}; "
                         f"ids look like {ids[0]!r} (the images config's image_id)")
    cols = guard_columns(name)
    found = [predictions.get(i) for i in ids]
    raw = [None if f is None else f[0] for f in found]
    pred = label_names([ST.UNPARSABLE if r is None else r for r in raw], "predictions", allow_unknown=True)
    out = {c: table[c] for c in keep}
    out[cols["pred"]] = pred
    out[cols["score"]] = [None if f is None else _score(f[1]) for f in found]
    out[cols["raw"]] = [None if r is None else str(r) for r in raw]
    out[cols["rationale"]] = ["no prediction in the file" if f is None else "" for f in found]
    out[cols["status"]] = [ST.MISSING if f is None else ST.OK if p != S.UNKNOWN else ST.UNPARSABLE
                           for f, p in zip(found, pred)]
    return out, _problems(ids, out, found, cols)


def score_file(dataset: str, predictions: str | Path, out: str | Path, config: ScoreConfig | None = None,
               split: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Score a predictions file against a release and write ``results.json``, ``predictions.parquet``
    and ``report.html`` into ``out`` (the same metrics and layout as `evaluate.stage.evaluate_run`).

    Args:
        dataset: a release folder or ``ORG/NAME``.
        predictions: a ``.csv``, ``.jsonl``/``.json`` or ``.parquet`` file (see `ScoreConfig`).
        out: the output folder (appears whole, or not at all).
        config: columns, name and bootstrap settings.
        split: the release split (default: test, else train).
        overwrite: replace a non-empty ``out``.

    Returns:
        The results dict (as written to ``results.json``).

    Raises:
        ValueError: for a folder that is not a release or a file that does not match it.
    """
    from dataclasses import replace

    from safetypairs.evaluate.report import release_outcomes, render_report

    config = config or ScoreConfig()
    if not config.name:
        config = replace(config, name=f"file:{Path(predictions).name}")
    images = load_release(dataset, "images", split or "auto")
    if images is None:
        raise ValueError(f"{dataset} is not a SafetyPairs release (no 'images' config); make one with "
                         "`safetypairs release <validated folder> --out <release folder>`")
    pairs = load_release(dataset, "pairs", split or "auto")
    rejected = load_release(dataset, "rejected", "auto")
    table, problems = prediction_table(images, read_predictions(predictions, config), config.name)
    if problems["missing"]["n"] and not config.allow_missing:
        raise ValueError(f"{problems['missing']['n']} of {len(images)} images have no prediction in {predictions}, "
                         f"e.g. {problems['missing']['first']}; predict every image of the images config, or pass "
                         "--allow-missing to count them as errors")
    statuses = dict(Counter(table[guard_columns(config.name)["status"]]).most_common())
    results = score_predictions(table, config, pairs=pairs, runs={config.name: {"statuses": statuses}})
    results["predictions_file"] = problems
    results["release"] = release_outcomes(len(pairs) if pairs is not None else 0, rejected)
    for what, text in (("missing", "have no prediction in the file (each counts as an error)"),
                       ("unparsable", "have a prediction that is not safe/unsafe/0/1 (each counts as an error)"),
                       ("unreadable_scores", "have a score that is not a number (left out of AUROC)")):
        if problems[what]["n"]:
            warning = f"{problems[what]['n']} image(s) {text}, e.g. {problems[what]['first']}"
            logger.warning("score: %s", warning)
            results["guards"][config.name]["warnings"].append(warning)
    results["dataset"] = {"path": str(dataset), "split": split or str(images.split), "n_rows": len(images),
                          "fingerprint": content_fingerprint(images), "predictions": str(predictions)}
    inputs = tuple(p for p in (dataset, predictions) if Path(p).exists())
    with atomic_dir(out, overwrite, inputs) as work:
        Dataset.from_dict(table).to_parquet(str(work / "predictions.parquet"))
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        render_report(results, work / "report.html", pairs=pairs)
    return results
