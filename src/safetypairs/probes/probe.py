"""Linear probes on image embeddings: labelled data in, a class-weighted logistic regression out (C on a validation split)."""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from safetypairs.backends.probe import LinearProbe, save_probe
from safetypairs.probes.embed import EmbedConfig, run_embed, embed_run
from safetypairs.identity import Identity, identity_of, merged_groups
from safetypairs.evaluate.metrics import encode_labels
from safetypairs.backends.registry import parse_spec
from safetypairs.schema import (
    EMBED_STATUS,
    EMBEDDING,
    LABEL,
    ROLE,
    role_names,
)
from safetypairs.statuses import OK

logger = logging.getLogger(__name__)

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
DEFAULT_C = 1.0  # used when a class has too few examples to hold one out for validation
DEFAULT_THRESHOLD = 0.5  # likewise, the P(unsafe) cut
PAIR_ROLES = ("original", "edited")  # the pair images used for training (controls are left out)


@dataclass(frozen=True)
class ProbeConfig:
    """How a probe is fitted.

    Attributes:
        encoder: the encoder spec whose embeddings the probe reads (recorded in the probe).
        c_grid: inverse regularisation strengths tried on the validation split.
        val_fraction: share of training groups held out to choose C (then the probe is refit on all).
        seed: seed of the validation split.
        max_iter: L-BFGS iterations.
    """

    encoder: str
    c_grid: tuple[float, ...] = C_GRID
    val_fraction: float = 0.25
    seed: int = 0
    max_iter: int = 1000

    def __post_init__(self) -> None:
        parse_spec("encoders", self.encoder)
        if not self.c_grid or any(c <= 0 for c in self.c_grid):
            raise ValueError(f"ProbeConfig.c_grid must be non-empty and positive, got {self.c_grid}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"ProbeConfig.val_fraction must be in (0, 1), got {self.val_fraction}")


def _logistic(c: float, max_iter: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter)


def validation_split(y: np.ndarray, groups: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Hold out about ``fraction`` of the groups (a pair's images stay together), both classes on each side.

    Returns:
        ``(train indices, validation indices)``, or ``None`` when no such split exists in 20 draws.
    """
    unique = np.unique(groups)
    n_val = max(1, int(round(fraction * len(unique))))
    if n_val >= len(unique):
        return None
    for _ in range(20):
        held = np.isin(groups, rng.choice(unique, size=n_val, replace=False))
        if len(np.unique(y[held])) == 2 and len(np.unique(y[~held])) == 2:
            return np.flatnonzero(~held), np.flatnonzero(held)
    return None


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1)]))


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The P(unsafe) cut with the best balanced accuracy on held-out rows (ties: the cut nearest 0.5).

    Candidate cuts lie halfway between consecutive distinct probabilities (and below / above them all).
    """
    values = np.unique(p)
    cuts = np.r_[values[0] / 2, (values[1:] + values[:-1]) / 2, (1 + values[-1]) / 2]
    scores = np.array([_balanced_accuracy(y, (p >= t).astype(np.int64)) for t in cuts])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def fit_probe(x: np.ndarray, y: np.ndarray, config: ProbeConfig, groups: np.ndarray | None = None) -> LinearProbe:
    """Fit a class-weighted logistic regression, C and the decision threshold chosen on a grouped
    validation split, then refit on all rows.

    C is the grid value with the best validation balanced accuracy at P(unsafe) 0.5 (ties: lower
    log-loss, then smaller C); the threshold is the cut with the best validation balanced accuracy
    of that C's model (`choose_threshold`). When a class has fewer than two groups no split exists:
    ``DEFAULT_C`` and the threshold 0.5 are used, and ``meta`` says so.

    Args:
        x: embeddings ``(n, dim)``.
        y: labels, 1 = unsafe, 0 = safe.
        config: the grid, validation share and seed.
        groups: a group per row (rows of one source, see `identity.merged_groups`); default: every row its own.

    Returns:
        The probe; ``meta`` records C, the threshold, how both were chosen, the validation scores and class counts.

    Raises:
        ValueError: when ``y`` does not hold both classes.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if len(np.unique(y)) != 2:
        raise ValueError(f"a probe needs safe and unsafe examples, got labels {sorted(set(y.tolist()))}")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    split = validation_split(y, groups, config.val_fraction, np.random.default_rng(config.seed))
    chosen, threshold, how, scores = DEFAULT_C, DEFAULT_THRESHOLD, "default (too few examples for a validation split)", {}
    if split is not None:
        train, val = split
        val_p = {}
        for c in config.c_grid:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence warnings on separable toy data
                model = _logistic(c, config.max_iter).fit(x[train], y[train])
            p = np.clip(model.predict_proba(x[val])[:, 1], 1e-9, 1 - 1e-9)
            loss = float(-np.mean(y[val] * np.log(p) + (1 - y[val]) * np.log(1 - p)))
            scores[c], val_p[c] = (_balanced_accuracy(y[val], (p >= 0.5).astype(np.int64)), -loss, -c), p
        chosen = max(scores, key=scores.get)
        threshold = choose_threshold(y[val], val_p[chosen])
        how = f"validation split ({len(val)} rows)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _logistic(chosen, config.max_iter).fit(x, y)
    meta = {"C": chosen, "threshold": threshold, "C_selection": how, "c_grid": list(config.c_grid),
            "val_balanced_accuracy": {str(c): s[0] for c, s in scores.items()},
            "n_train": int(len(y)), "n_unsafe": int(y.sum()), "n_safe": int(len(y) - y.sum())}
    return LinearProbe(model.coef_[0].astype(np.float32), float(model.intercept_[0]), config.encoder, meta,
                       threshold)


def embedded_arrays(rows: Dataset, name: str) -> tuple[np.ndarray, np.ndarray, Identity]:
    """``(embeddings, labels, identity)`` of the rows whose embedding succeeded (others are logged and left out).

    Raises:
        ValueError: for rows without ``embedding`` or ``label`` columns or with labels other than safe/unsafe.
    """
    missing = [c for c in (EMBEDDING, LABEL) if c not in rows.column_names]
    if missing:
        raise ValueError(f"{name}: embedded rows need columns {missing}; columns: {', '.join(rows.column_names)}")
    ok = [i for i, s in enumerate(rows[EMBED_STATUS] if EMBED_STATUS in rows.column_names else [OK] * len(rows))
          if s == OK]
    if len(ok) < len(rows):
        logger.warning("%s: %d of %d rows have no embedding (unreadable image); left out", name,
                       len(rows) - len(ok), len(rows))
    rows = rows.select(ok)
    x = np.asarray(rows.with_format("numpy")[EMBEDDING], dtype=np.float32)
    return x.reshape(len(rows), -1), encode_labels(rows[LABEL], f"{name} labels", allow_unknown=False), \
        identity_of(rows, name)


def pair_rows(rows: Dataset) -> Dataset:
    """The originals and edits of a release's ``images`` config (controls left out)."""
    if ROLE not in rows.column_names:
        return rows
    return rows.filter(lambda roles: [r in PAIR_ROLES for r in role_names(roles)], input_columns=ROLE, batched=True)


def embed_cached(rows: Dataset, config: EmbedConfig, cache: str | Path | None, name: str) -> Dataset:
    """The rows' embeddings: as given when already embedded, else through `embed_run` into ``cache``
    (a rerun on the same rows and encoder reuses it: no encoder call), or in memory without a cache.

    Args:
        rows: labelled rows (images or an ``embedding`` column).
        config: the encoder and batching.
        cache: folder for embed runs (one sub-folder per name and encoder), or ``None``.
        name: a short name of the rows (``base``, ``pairs``, ``eval``).

    Returns:
        Embedded rows.
    """
    if EMBEDDING in rows.column_names:
        return rows
    if cache is None:
        return run_embed(rows, config)[0]
    from safetypairs.engine.datafiles import load_run
    from safetypairs.engine.runner import RunConfig

    folder = Path(cache) / f"{name}-{hashlib.sha1(config.encoder.encode()).hexdigest()[:10]}"
    embed_run(rows, config, RunConfig(out=folder, source=name, overwrite=True))
    return load_run(folder)


def train_probe(train: Dataset, config: ProbeConfig, out: str | Path, pairs: Dataset | None = None,
                embed: EmbedConfig | None = None) -> LinearProbe:
    """Embed (unless already embedded), fit and save a probe that loads as the guard ``linear-probe:<out>``.

    Args:
        train: labelled rows (``image``/``embedding`` and ``label``).
        config: the encoder and C selection.
        out: the probe folder (``probe.safetensors`` + ``probe.json``).
        pairs: a release's ``images`` config whose originals and edits are added to the training rows.
        embed: embedding settings (default: ``config.encoder`` on the CPU/GPU automatically).

    Returns:
        The fitted probe.

    Raises:
        ValueError: for unlabelled rows or a single class.
    """
    embed = embed or EmbedConfig(encoder=config.encoder)
    parts = [embed_cached(train, embed, None, "train")]
    if pairs is not None:
        parts.append(embed_cached(pair_rows(pairs), embed, None, "pairs"))
    arrays = [embedded_arrays(part, name) for part, name in zip(parts, ("train", "pairs"))]
    x = np.concatenate([a[0] for a in arrays])
    y = np.concatenate([a[1] for a in arrays])
    groups = merged_groups(*(a[2] for a in arrays))
    probe = fit_probe(x, y, config, groups)
    probe.meta.update(n_pairs_images=int(len(arrays[1][1])) if pairs is not None else 0,
                      n_groups=int(len(set(groups))), groups="source groups merged where they share an image")
    save_probe(probe, out)
    logger.info("probe on %s: C=%s (%s), %d rows; saved to %s", config.encoder, probe.meta["C"],
                probe.meta["C_selection"], len(y), out)
    return probe

