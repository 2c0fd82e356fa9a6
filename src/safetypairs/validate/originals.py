"""Work done once per original and reused by its K candidates: the decoded original, its VAE round trip, the CIELAB
values of the reference they share and the judge's verdict on the original.

The K candidates of a source carry the same original; each candidate row used to decode it, round-trip it through
the editor's VAE and have the judge classify it again. `Originals` keeps those results for one validation map (one
`ValidateTransform`, so per process and per run: nothing outlives the run or crosses processes), keyed by the
original's digest, so they are computed once whether the candidates share a batch or not. Each kind is a small LRU:
decoded images and round trips are megabytes each, verdicts are a few hundred bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Hashable, TypeVar

from safetypairs.engine.imagechecks import bytes_digest
from safetypairs.images import image_digest
from safetypairs.utils import LRU

V = TypeVar("V")

DECODED_ORIGINALS = 4  # 1 MP: ~15 MB each (RGB + float32 working copy); candidates of a source are usually adjacent
ROUND_TRIPS = 4  # 1 MP: ~15 MB each (RGB + float32 working copy)
REFERENCE_LABS = 4  # 1 MP: ~12 MB each
VERDICTS = 4096


class Originals:
    """The per-original results of one validation map (see the module docstring)."""

    def __init__(self) -> None:
        self.decoded: LRU[tuple[Any, Any]] = LRU(DECODED_ORIGINALS)
        self.roundtrips: LRU[Any] = LRU(ROUND_TRIPS)
        self.labs: LRU[Any] = LRU(REFERENCE_LABS)
        self.verdicts: LRU[Any] = LRU(VERDICTS)

    def decode(self, cell: Any, max_pixels: int, load: Callable[[], tuple[Any, Any]]) -> tuple[str, Any, Any]:
        """The original of ``cell`` as ``load()`` makes it, decoded once per stored bytes.

        Args:
            cell: the image cell; an undecoded ``{"bytes", ...}`` cell is found by the digest of its bytes
                (hashing is ~50x cheaper than decoding), any other is decoded and found by its pixel digest.
            max_pixels: the pixel cap it is read under (part of the key: another cap reads other pixels).
            load: decodes the cell: ``(image, anything derived from it)``; its errors propagate.

        Returns:
            ``(key, image, derived)``: ``key`` names the original for `roundtrip` and `verdict`.
        """
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if data is None:
            image, derived = load()
            return f"pixels:{image_digest(image)}", image, derived
        key = f"bytes:{bytes_digest(data)}:{max_pixels}"
        found = self.decoded.get(key)
        if found is None:
            found = load()
            self.decoded.put(key, found)
        return key, *found



def split(cache: LRU[V], keys: list[Hashable]) -> tuple[dict[Hashable, V], list[int]]:
    """What ``cache`` knows of ``keys``, and the places of the first occurrence of each key it does not know.

    Returns:
        ``(known, todo)``: ``{key: value}`` of the known keys, and the indices into ``keys`` to compute (each
        unknown key once); the caller adds what it computes to ``known`` (and to ``cache``), so a cache
        smaller than one batch still answers every row.
    """
    known: dict[Hashable, V] = {}
    todo: list[int] = []
    seen: set[Hashable] = set()
    for i, key in enumerate(keys):
        if key in seen:
            continue
        seen.add(key)
        value = cache.get(key)
        if value is None:
            todo.append(i)
        else:
            known[key] = value
    return known, todo
