"""Caveats a result must carry: guards that share the validation judge's backend, edits no judge checked, edits made
with an approximated editor (a step cache, quantised weights)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from safetypairs import schema as S
from safetypairs.backends.registry import backend_class, parse_spec

CIRCULARITY_NOTE = (
    "Circular by construction: pairs were accepted only when the validation judge ({judge}) called the original "
    "unsafe and the edit safe. This guard shares the judge's backend ({backend}), so its scores on these pairs "
    "measure agreement with the judge, not independent guard quality."
)
NO_JUDGE_NOTE = (
    "No judge checked that the edits flip the label (label_flip_checked = false for {n} of {total} pairs): those "
    "pairs passed the pixel checks only, so a 'safe' edit may still be unsafe. Validate with --judge to check it."
)

APPROXIMATE_NOTE = (
    "Edited with an approximated editor ({editors}): a step cache reuses block outputs across denoising steps and "
    "quantisation lowers the weights' precision, so these edits differ from the full model's, and validation "
    "thresholds calibrated on the full model may not hold."
)


def backend_of(spec: str, kind: str = "guards") -> tuple[str, str | None]:
    """``(alias, model)`` of a judge or guard spec as the registry reads it (the model ``None`` when the backend names
    none); a spec not registered here (a judge of another install) names itself: ``(spec, None)``."""
    try:
        parsed = parse_spec(kind, spec)
    except ValueError:
        return spec, None
    return parsed.alias, parsed.model


def shares_backend(guard: str, judge: str) -> bool:
    """Whether a guard and a judge are the same backend: the same model (under any alias) when both name one,
    else the same alias (``ocr-lexicon`` with other thresholds is still the same OCR models and lexicon)."""
    g_alias, g_model = backend_of(guard, "guards")
    j_alias, j_model = backend_of(judge, "judges")
    if g_model is not None and j_model is not None:
        return g_model == j_model
    return g_alias == j_alias


def circularity_notes(guards: Iterable[str], judges: Iterable[str | None]) -> dict[str, str]:
    """A circularity warning per guard that shares a backend with a judge that validated the pairs."""
    used = sorted({j for j in judges if j})
    notes = {}
    for guard in guards:
        shared = [j for j in used if shares_backend(guard, j)]
        if shared:
            notes[guard] = CIRCULARITY_NOTE.format(judge=", ".join(shared), backend=backend_of(guard)[0])
    return notes


def unchecked_flips(checked: Sequence[Any] | None, judges: Sequence[Any]) -> str | None:
    """The warning for pairs no judge checked (``label_flip_checked`` false; where it is missing, no judge
    recorded), else ``None``."""
    checked = checked if checked is not None else [None] * len(judges)
    flags = [bool(j) if c is None else bool(c) for c, j in zip(checked, judges)]
    total = len(flags)
    n = sum(not f for f in flags)
    return NO_JUDGE_NOTE.format(n=n, total=total) if n else None


def approximated_editors(editors: Iterable[str | None]) -> str | None:
    """The warning for editor specs named with an approximation their backend declares (``APPROXIMATIONS``, e.g.
    ``diffusers:<model>,cache=first_block``; see `edit.editor_name`), else ``None``."""
    named = []
    for spec in sorted({e for e in editors if e}):
        try:
            options = parse_spec("editors", spec).options
            approximations = getattr(backend_class("editors", spec), "APPROXIMATIONS", ())
        except (ValueError, ImportError):  # an editor of another install names no approximation here
            continue
        if any(options.get(name) not in (None, "", "none") for name in approximations):
            named.append(f"`{spec}`")
    return APPROXIMATE_NOTE.format(editors=", ".join(named)) if named else None


def release_caveats(pairs: Any, guards: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Per-guard notes and run-level warnings for an evaluation on a release's ``pairs`` rows.

    Args:
        pairs: the ``pairs`` config (a `Dataset` or a column mapping), or ``None``.
        guards: the evaluated guard specs.

    Returns:
        ``(notes, warnings)``: circularity notes keyed by guard spec, and warnings about the release (pairs no judge
        checked, edits made with an approximated editor).
    """
    if pairs is None:
        return {}, []
    columns = pairs.column_names if hasattr(pairs, "column_names") else list(pairs)
    judges = list(pairs[S.JUDGE]) if S.JUDGE in columns else []
    checked = list(pairs[S.LABEL_FLIP_CHECKED]) if S.LABEL_FLIP_CHECKED in columns else None
    warnings = [unchecked_flips(checked, judges),
                approximated_editors(pairs[S.EDITOR]) if S.EDITOR in columns else None]
    return circularity_notes(guards, judges), [w for w in warnings if w]
