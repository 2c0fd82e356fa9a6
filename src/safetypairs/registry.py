"""Backend registries addressed by spec strings such as ``diffusers:<model id or path>``.

Every backend is named here by ``"module:Class"`` so that nothing heavy is imported until a
backend is built. A backend class implements ``from_spec(arg, device, **options)``.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from dataclasses import dataclass
from typing import Any

KINDS = ("instructors", "editors", "judges", "guards", "encoders")

_CLASSIFIERS = {
    "ocr-lexicon": "safetypairs.backends.guards:OCRLexiconGuard",
    "nudenet": "safetypairs.backends.guards:NudeNetGuard",
    "hf-vlm": "safetypairs.backends.vlm_guards:HFVLMGuard",
    "llavaguard": "safetypairs.backends.vlm_guards:LlavaGuard",
    "shieldgemma2": "safetypairs.backends.vlm_guards:ShieldGemma2Guard",
    "clip-zeroshot": "safetypairs.backends.clip_guard:CLIPZeroShotGuard",
    "linear-probe": "safetypairs.backends.probe:LinearProbeGuard",
}

REGISTRY: dict[str, dict[str, str]] = {
    "instructors": {
        "template": "safetypairs.backends.template:TemplateInstructor",
        "column": "safetypairs.backends.template:ColumnInstructor",
        "hf-vlm": "safetypairs.backends.vlm_instruct:HFVLMInstructor",
    },
    "editors": {
        "ocr-inpaint": "safetypairs.backends.ocr_edit:OCRInpaintEditor",
        "diffusers": "safetypairs.backends.diffusion:DiffusersEditor",
    },
    "judges": dict(_CLASSIFIERS),
    "guards": dict(_CLASSIFIERS),
    "encoders": {
        "lpips": "safetypairs.backends.encoders:LPIPSEncoder",
        "open_clip": "safetypairs.backends.encoders:OpenCLIPEncoder",
        "hf-clip": "safetypairs.backends.encoders:HFCLIPEncoder",
        "ocr-text": "safetypairs.backends.ocr_text:OCRTextEncoder",
    },
}


@dataclass(frozen=True)
class Spec:
    """A parsed backend spec: ``alias`` names the backend, ``arg`` is everything after the first
    colon (a model id, a local path, or ``key=value`` options), ``None`` when absent."""

    kind: str
    alias: str
    arg: str | None

    def __str__(self) -> str:
        return self.alias if self.arg is None else f"{self.alias}:{self.arg}"


def _check_kind(kind: str) -> None:
    if kind not in REGISTRY:
        raise ValueError(f"unknown backend kind {kind!r}; allowed: {', '.join(KINDS)}")


def available(kind: str) -> list[str]:
    """List the aliases registered for a backend kind.

    Args:
        kind: one of ``instructors, editors, judges, guards, encoders``.

    Returns:
        Sorted aliases.

    Raises:
        ValueError: for an unknown kind.
    """
    _check_kind(kind)
    return sorted(REGISTRY[kind])


def parse_spec(kind: str, spec: str) -> Spec:
    """Parse ``alias[:arg]`` and check that the alias is registered for ``kind``.

    Args:
        kind: the backend kind.
        spec: e.g. ``"template"``, ``"diffusers:timbrooks/instruct-pix2pix"``,
            ``"clip-zeroshot:open_clip:ViT-B-32/openai"``.

    Returns:
        The parsed `Spec`.

    Raises:
        ValueError: for an empty spec or an unknown alias, with a "did you mean" hint.
    """
    _check_kind(kind)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty {kind[:-1]} spec; allowed backends: {', '.join(available(kind))}")
    alias, sep, arg = spec.strip().partition(":")
    if alias not in REGISTRY[kind]:
        close = difflib.get_close_matches(alias, REGISTRY[kind], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown {kind[:-1]} {alias!r} in spec {spec!r}.{hint} "
            f"Allowed: {', '.join(available(kind))}"
        )
    return Spec(kind=kind, alias=alias, arg=arg if sep and arg else None)


def parse_options(arg: str | None) -> dict[str, str]:
    """Parse ``key=value,key=value`` backend options (values stay strings).

    Raises:
        ValueError: for an item without ``=``.
    """
    if not arg:
        return {}
    options = {}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad backend option {item!r} in {arg!r}; expected key=value[,key=value]")
        options[key.strip()] = value.strip()
    return options


def split_model_arg(arg: str | None, alias: str) -> tuple[str, dict[str, str]]:
    """Split a model backend's ``"<model id or path>[,key=value,...]"`` into the model and its options.

    Raises:
        ValueError: when the model is missing.
    """
    model, _, rest = (arg or "").partition(",")
    if not model.strip():
        raise ValueError(f"{alias} needs a model: {alias}:<hub id or local path>[,key=value,...]")
    return model.strip(), parse_options(rest)


def parse_bool(value: Any, name: str) -> bool:
    """Read a boolean backend option given as a bool or as text (``true/false``, ``1/0``, ``yes/no``, ``on/off``).

    Raises:
        ValueError: for any other value, naming the option.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {name} expects true or false, got {value!r}")


def backend_class(kind: str, spec: str) -> type:
    """Import and return the class that implements ``spec``."""
    parsed = parse_spec(kind, spec)
    module_name, _, attr = REGISTRY[kind][parsed.alias].partition(":")
    return getattr(importlib.import_module(module_name), attr)


@functools.lru_cache(maxsize=16)
def _load(kind: str, spec: str, device: str, options: tuple[tuple[str, Any], ...]) -> Any:
    parsed = parse_spec(kind, spec)
    return backend_class(kind, spec).from_spec(parsed.arg, device=device, **dict(options))


def load_backend(kind: str, spec: str, device: str = "cpu", **options: Any) -> Any:
    """Build a backend once per process, device and options (later calls reuse it).

    Args:
        kind: the backend kind.
        spec: the spec string.
        device: torch device string for backends that use one.
        **options: hashable backend options (dtype, thresholds, ...).

    Returns:
        The backend instance.

    Raises:
        ValueError: for an unknown spec.
    """
    return _load(kind, spec, device, tuple(sorted(options.items())))
