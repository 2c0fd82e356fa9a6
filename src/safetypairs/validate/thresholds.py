"""Validation thresholds: presets per editor family, files written by ``safetypairs calibrate``, and which apply to a row."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset

from safetypairs.backends.registry import parse_spec
from safetypairs.utils import Range, check_ranges

FORMAT = "safetypairs-thresholds/1"
PIXEL_EXACT = "pixel-exact"
LATENT_DIFFUSION = "latent-diffusion"
# Editors whose output is re-rendered through a VAE (every pixel changes a little) use LATENT_DIFFUSION.
LATENT_EDITORS = ("diffusers",)

# The allowed values of each `Thresholds` field (``ValidateConfig``'s overrides are checked by the same table).
RANGES = {
    "mask_delta_e": Range(0, open_low=True),
    "min_element_fraction": Range(0, 1, open_high=True),
    "max_changed_fraction": Range(0, 1, open_low=True),
    "max_change_spread": Range(0, 1, open_low=True),
    "min_ssim_outside": Range(-1, 1),
    "min_psnr_outside": Range(0),
    "max_lpips_outside": Range(0, optional=True),
    "min_clip_outside": Range(-1, 1, optional=True),
}


@dataclass(frozen=True)
class Thresholds:
    """The numbers validation decides with (see `ValidateConfig` for how each is measured).

    Attributes:
        mask_delta_e: CIE76 ΔE above which a pixel counts as changed (vs the reference image).
        min_element_fraction: the largest connected change (before the mask's speckle cleaning) must
            cover at least this share of the image, else the edit is ``no_change``; a thin removed
            object (a 60 px antenna tip on a 384 px photo) counts, editor noise does not.
        max_changed_fraction: the cleaned mask may cover at most this share (a policy cap).
        max_change_spread: share of the grid cells the change may touch.
        min_ssim_outside / min_psnr_outside: preservation needed outside the dilated mask.
        max_lpips_outside / min_clip_outside: optional (``None`` = recorded, not used).
    """

    mask_delta_e: float = 8.0
    min_element_fraction: float = 0.0005
    max_changed_fraction: float = 0.35
    max_change_spread: float = 0.5
    min_ssim_outside: float = 0.91
    min_psnr_outside: float = 32.5
    max_lpips_outside: float | None = None
    min_clip_outside: float | None = None

    def __post_init__(self) -> None:
        check_ranges("threshold", self.as_dict(), RANGES)

    def as_dict(self) -> dict[str, float | None]:
        """The values as a plain dict (YAML / JSON ready)."""
        return dataclasses.asdict(self)


# pixel-exact: paste, OpenCV inpainting, text re-rendering (python -m benchmarks.calibration).
# latent-diffusion: measured against the control or the VAE round trip, the editor's fingerprint mostly cancels;
# what is left (stochastic texture, a slightly different colour cast between two runs) needs looser
# preservation thresholds and a higher ΔE (python -m benchmarks.calibration --fingerprint ... --reference original
# prints the worst case, the plain original as reference).
PRESETS: dict[str, Thresholds] = {
    PIXEL_EXACT: Thresholds(),
    LATENT_DIFFUSION: Thresholds(mask_delta_e=10.0, max_change_spread=0.5, min_ssim_outside=0.80,
                                 min_psnr_outside=27.0),
}


def preset_for_editor(editor: str | None) -> str:
    """The preset for an editor spec: `LATENT_DIFFUSION` for ``diffusers:...`` editors, else `PIXEL_EXACT`.

    Args:
        editor: the row's ``editor`` column (``None`` when unknown).

    Returns:
        A key of `PRESETS` (`PIXEL_EXACT` for an editor not registered here).
    """
    try:
        alias = parse_spec("editors", editor).alias if editor else None
    except ValueError:  # an editor of another install
        alias = None
    return LATENT_DIFFUSION if alias in LATENT_EDITORS else PIXEL_EXACT


def load_thresholds(name_or_path: str) -> Thresholds:
    """A preset by name, or a YAML file written by `write_thresholds` (``safetypairs calibrate``).

    Args:
        name_or_path: a key of `PRESETS` or a path to a ``.yaml`` file with a ``thresholds`` mapping.

    Returns:
        The thresholds.

    Raises:
        ValueError: for an unknown preset, a file of another format or an unknown/bad value.
        OSError: when the file cannot be read.
    """
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        raise ValueError(f"thresholds must be one of {', '.join(PRESETS)} or a YAML file, got {name_or_path!r}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("thresholds"), dict):
        raise ValueError(f"{path} is not a thresholds file (expected format: {FORMAT} and a thresholds mapping)")
    values = data["thresholds"]
    allowed = [f.name for f in dataclasses.fields(Thresholds)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown threshold(s) {unknown} in {path}; allowed: {', '.join(allowed)}")
    try:
        return Thresholds(**{k: None if v is None else float(v) for k, v in values.items()})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def write_thresholds(path: str | Path, thresholds: Thresholds, **about: Any) -> Path:
    """Write a thresholds YAML file that `load_thresholds` (and ``validate --thresholds``) reads.

    Args:
        path: the output file.
        thresholds: the values.
        **about: provenance stored beside the values (editor, images, fit table...).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {k: None if v is None else _round(v) for k, v in thresholds.as_dict().items()}
    text = yaml.safe_dump({"format": FORMAT, "thresholds": values, **about}, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value


@functools.lru_cache(maxsize=64)
def thresholds_for(config: Any, editor: str | None) -> tuple[str, Thresholds]:
    """The thresholds a row with editor spec ``editor`` is decided with.

    Args:
        config: a hashable `ValidateConfig`: ``thresholds`` (preset or file; ``None`` = by editor) and the
            per-field overrides (attributes named like the `Thresholds` fields).
        editor: the row's ``editor`` value (``None`` when unknown).

    Returns:
        ``(label, thresholds)``: the preset name or file path (``+overrides`` when fields were set).

    Raises:
        ValueError: for an unknown preset, a bad file or an out-of-range value.
    """
    name = config.thresholds or preset_for_editor(editor)
    fields = [f.name for f in dataclasses.fields(Thresholds)]
    overrides = {f: getattr(config, f) for f in fields if getattr(config, f, None) is not None}
    values = dataclasses.replace(load_thresholds(name), **overrides)
    return (f"{name}+overrides" if overrides else name), values


def thresholds_used(dataset: Dataset, config: Any) -> dict[str, Any]:
    """What a run decides with, for its run metadata (``run.json``): per editor, the thresholds' label and values.

    Args:
        dataset: the rows to validate (only the editor column is read).
        config: the stage settings.

    Returns:
        ``{"thresholds": config.thresholds or "auto", "reference": ..., "composite": ...,
        "by_editor": {editor: {"thresholds": label, "values": {...}}}}`` (``"unknown"`` for rows
        without an editor).
    """
    column = config.editor_column
    editors = sorted(set(dataset.select_columns([column])[column]), key=str) if column in dataset.column_names else [None]
    by_editor = {}
    for editor in editors:
        label, values = thresholds_for(config, editor)
        by_editor[editor or "unknown"] = {"thresholds": label, "values": values.as_dict()}
    return {"thresholds": config.thresholds or "auto", "reference": config.reference, "composite": config.composite,
            "feather_px": config.feather_px, "by_editor": by_editor}
