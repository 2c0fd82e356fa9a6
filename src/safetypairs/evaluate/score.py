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
    """

    name: str = ""
    id_column: str = S.IMAGE_ID
    prediction_column: str = "prediction"
    score_column: str = "score"
    policy: str | Policy = "llavaguard"
    n_bootstrap: int = 1000
    seed: int = 0

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
    table = Dataset.from_pandas(_read_frame(path), preserve_index=False)
    missing = [c for c in (config.id_column, config.prediction_column) if c not in table.column_names]
    if missing:
        raise ValueError(f"predictions file {str(path)!r} lacks column(s) {missing}; columns: "
                         f"{', '.join(table.column_names)} (name them with --id-column / --prediction-column)")
    ids = [str(v) for v in table[config.id_column]]
    repeated = [k for k, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(f"predictions file {str(path)!r} names image(s) {repeated[:5]} more than once")
    scores = table[config.score_column] if config.score_column in table.column_names else [None] * len(ids)
    return {i: (p, _score(s)) for i, p, s in zip(ids, table[config.prediction_column], scores)}


def _read_frame(path: Path) -> Any:
    import pandas as pd

    kind = READERS[path.suffix.lower()]
    if kind == "csv":
        return pd.read_csv(path, dtype={0: str}, keep_default_na=False, na_values=[""])
    if kind == "parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=path.suffix.lower() == ".jsonl", dtype=False)


def _score(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def prediction_table(images: Dataset, predictions: dict[str, tuple[Any, float | None]], name: str) -> dict[str, list]:
    """The release's labels joined with the file's predictions, in `evaluate.stage.predict`'s column layout.

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
    out[cols["score"]] = [None if f is None else f[1] for f in found]
    out[cols["raw"]] = [None if r is None else str(r) for r in raw]
    out[cols["rationale"]] = ["no prediction in the file" if f is None else "" for f in found]
    out[cols["status"]] = [ST.MISSING if f is None else ST.OK if p != S.UNKNOWN else ST.UNPARSABLE
                           for f, p in zip(found, pred)]
    return out


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

    from safetypairs.evaluate.report import render_report

    config = config or ScoreConfig()
    if not config.name:
        config = replace(config, name=f"file:{Path(predictions).name}")
    images = load_release(dataset, "images", split or "auto")
    if images is None:
        raise ValueError(f"{dataset} is not a SafetyPairs release (no 'images' config); make one with "
                         "`safetypairs release <validated folder> --out <release folder>`")
    pairs = load_release(dataset, "pairs", split or "auto")
    table = prediction_table(images, read_predictions(predictions, config), config.name)
    statuses = dict(Counter(table[guard_columns(config.name)["status"]]).most_common())
    if statuses.get(ST.MISSING):
        logger.warning("score: %d of %d images have no prediction in %s; they count as errors",
                       statuses[ST.MISSING], len(images), predictions)
    results = score_predictions(table, config, pairs=pairs, runs={config.name: {"statuses": statuses}})
    results["dataset"] = {"path": str(dataset), "split": split or str(images.split), "n_rows": len(images),
                          "fingerprint": content_fingerprint(images), "predictions": str(predictions)}
    inputs = tuple(p for p in (dataset, predictions) if Path(p).exists())
    with atomic_dir(out, overwrite, inputs) as work:
        Dataset.from_dict(table).to_parquet(str(work / "predictions.parquet"))
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        render_report(results, work / "report.html", pairs=pairs)
    return results
