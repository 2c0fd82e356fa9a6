"""What an edit is compared with: the original, its artifact control (same editor and seed, no-op instruction) or the
original's round trip through the editor's own VAE, so the editor's fingerprint cancels."""

from __future__ import annotations

import functools
import logging
from typing import Any

from safetypairs import schema as S
from safetypairs.backends.registry import backend_class, from_spec_arguments
from safetypairs.validate.originals import Originals, split
from safetypairs.validate.pair import PairImages, at_work_size

logger = logging.getLogger(__name__)

REFERENCE_MODES = ("auto", "control", "original")  # ValidateConfig.reference: how a row's reference is chosen
REFERENCE_KINDS = ("original", "control", "vae_roundtrip")  # validate_reference: what a row was compared with

_UNAVAILABLE: dict[tuple[str, str], str] = {}  # (editor spec, device) -> why it has no VAE round trip here


def choose_references(c: Any, batch: dict[str, list], pairs: list[PairImages], device: str,
                      originals: Originals) -> None:
    """Pick each pair's reference: control, VAE round trip or original (``c.reference``, one of `REFERENCE_MODES`).

    Args:
        c: the `ValidateConfig`.
        batch: the input batch (editor and edit work-size columns).
        pairs: the readable pairs; ``reference`` (and ``reference_kind``) are set on each.
        device: where the VAE round trip runs.
        originals: the round trips made so far in this run (one per original, editor and working size).
    """
    for pair in pairs:
        if c.reference != "original" and pair.control_image is not None:
            pair.reference_image, pair.reference_kind = pair.control_image, "control"
            pair.reference = at_work_size(c, pair.control_image)
    if c.reference == "auto":
        n = len(batch[c.original_column])
        editors, sizes = batch.get(c.editor_column) or [None] * n, batch.get(S.EDIT_WORK_SIZE) or [None] * n
        vae_references(c, pairs, [editors[p.index] for p in pairs], [sizes[p.index] for p in pairs], device,
                       originals)
    for pair in pairs:
        if pair.reference is None:
            pair.reference, pair.reference_key = pair.original, ("original", pair.original_key)


def _load_roundtrip(spec: str, device: str) -> Any | None:
    """The VAE round trip of editor ``spec`` (its ``roundtrip_reference`` capability), or ``None``
    when the editor has none or it cannot load (one warning per process and spec)."""
    key = (spec, device)
    if key in _UNAVAILABLE:
        return None
    try:
        loader = getattr(backend_class("editors", spec), "roundtrip_reference", None)
        if loader is None:
            _UNAVAILABLE[key] = "no VAE round trip"
            return None
        return _roundtrip_cache(loader, spec, device)
    except Exception as err:  # unknown third-party editor, weights missing, ...: measure against the original
        _UNAVAILABLE[key] = f"{type(err).__name__}: {err}"
        logger.warning("no VAE round trip for %s on %s (%s); measuring against the original", spec, device,
                       _UNAVAILABLE[key])
        return None


@functools.lru_cache(maxsize=4)
def _roundtrip_cache(loader: Any, spec: str, device: str) -> Any:
    arg, options = from_spec_arguments("editors", spec)
    return loader(arg, device, **options)


def vae_references(c: Any, pairs: list[PairImages], editors: list[str | None], work_sizes: list[Any], device: str,
                   originals: Originals) -> None:
    """Give every pair without a reference the VAE round trip of its original, when its editor has one.

    An original is round-tripped once per editor and working size: its other candidates (in this batch or a
    later one of the run) reuse the image and its float copy from ``originals``.

    Args:
        c: the `ValidateConfig` (working resolution).
        pairs: readable pairs; those without a ``reference_image`` (no control) are considered.
        editors: the ``editor`` spec of each pair (same order).
        work_sizes: the ``edit_work_size`` the editor ran at per pair (``None`` when unknown).
        device: torch device for the VAE.
        originals: the round trips made so far.
    """
    groups: dict[str, list[int]] = {}
    for k, (pair, editor) in enumerate(zip(pairs, editors)):
        if pair.reference_image is None and editor:
            groups.setdefault(editor, []).append(k)
    for editor, members in groups.items():
        roundtrip = _load_roundtrip(editor, device)
        if roundtrip is None:
            continue
        keys = [(editor, tuple(work_sizes[k] or ()), pairs[k].original_key) for k in members]
        known, todo = split(originals.roundtrips, keys)
        made = roundtrip([pairs[members[t]].original_image for t in todo],
                         [work_sizes[members[t]] for t in todo]) if todo else []
        for t, image in zip(todo, made):
            known[keys[t]] = (image, at_work_size(c, image))
            originals.roundtrips.put(keys[t], known[keys[t]])
        for k, key in zip(members, keys):
            pairs[k].reference_image, pairs[k].reference = known[key]
            pairs[k].reference_kind, pairs[k].reference_key = "vae_roundtrip", ("vae_roundtrip", *key)
