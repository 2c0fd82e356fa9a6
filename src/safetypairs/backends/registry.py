"""Backend registries addressed by spec strings such as ``diffusers:<model id or path>``.

Every backend is named here by ``"module:Class"`` so that nothing heavy is imported until a
backend is built. A backend class implements ``from_spec(arg, device, **options)`` and the
Protocol of its kind (`safetypairs.backends.base`). Other packages add backends with `register`
or through the ``safetypairs.backends`` entry-point group (name ``"<kind>.<alias>"``, value
``"module:Class"``), read on the first lookup.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

KINDS = ("instructors", "editors", "judges", "guards", "encoders")
ENTRY_POINT_GROUP = "safetypairs.backends"
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
# A spec naming user code: "package.module:Object" (dotted identifiers on both sides, nothing else).
_IMPORT_SPEC = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")

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
_BUILTIN = {kind: dict(aliases) for kind, aliases in REGISTRY.items()}
_ORIGINS: dict[tuple[str, str], str] = {}  # where a non-built-in backend came from
_discovered = False


@dataclass(frozen=True)
class Spec:
    """A parsed backend spec: ``alias`` names the backend, ``arg`` is everything after the first
    colon (a model id, a local path, or ``key=value`` options), ``None`` when absent. A spec of user
    code (``package.module:Object``) has ``alias`` = the whole spec, ``arg`` ``None`` and ``imported``."""

    kind: str
    alias: str
    arg: str | None
    imported: bool = False

    def __str__(self) -> str:
        return self.alias if self.arg is None else f"{self.alias}:{self.arg}"


def _check_kind(kind: str) -> None:
    if kind not in REGISTRY:
        raise ValueError(f"unknown backend kind {kind!r}; allowed: {', '.join(KINDS)}")
    _discover()


def _entry_problem(kind: str, alias: str, target: str) -> str | None:
    """Why ``(kind, alias, target)`` cannot be registered, or ``None``."""
    if kind not in REGISTRY:
        return f"unknown backend kind {kind!r}; allowed: {', '.join(KINDS)}"
    if not _ALIAS.fullmatch(alias or ""):
        return f"bad alias {alias!r}: letters, digits and _.+- only, no ':' or ','"
    if not _TARGET.fullmatch(target or ""):
        return f"bad target {target!r}; expected 'module:Object'"
    return None


def register(kind: str, alias: str, target: str, *, replace: bool = False) -> None:
    """Add a backend to a registry so specs ``alias[:arg]`` build ``target`` (imported lazily).

    Args:
        kind: one of ``instructors, editors, judges, guards, encoders``.
        alias: the spec's name, e.g. ``"my-editor"`` (letters, digits and ``_.+-``).
        target: ``"module:Object"``, a class with ``from_spec(arg, device, **options)`` that
            implements its kind's Protocol (`safetypairs.backends.base`).
        replace: allow replacing a backend already registered under ``alias`` (built-in,
            registered or from an entry point); registering the same target again is a no-op.

    Raises:
        ValueError: for a bad kind, alias or target, or an alias taken by another target without
            ``replace=True``.
    """
    problem = _entry_problem(kind, alias, target)
    if problem:
        raise ValueError(f"cannot register {kind[:-1] if kind in REGISTRY else kind} {alias!r}: {problem}")
    _check_kind(kind)
    current = REGISTRY[kind].get(alias)
    if current == target:
        return
    if current is not None and not replace:
        raise ValueError(f"{kind[:-1]} {alias!r} is already registered as {current!r} ({origin(kind, alias)}); "
                         f"pass replace=True to replace it with {target!r}")
    REGISTRY[kind][alias] = target
    _ORIGINS[(kind, alias)] = "register()"
    _load.cache_clear()


def origin(kind: str, alias: str) -> str:
    """Where a registered backend comes from: ``built-in``, ``register()`` or ``entry point <dist>``."""
    if (kind, alias) in _ORIGINS:
        return _ORIGINS[(kind, alias)]
    return "built-in" if _BUILTIN.get(kind, {}).get(alias) == REGISTRY.get(kind, {}).get(alias) else "registered"


def _discover() -> None:
    """Read the ``safetypairs.backends`` entry points once (malformed or clashing ones are skipped with a warning)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(entry, "dist", None), "name", None) or "an unknown distribution"
        kind, _, alias = entry.name.partition(".")
        target = entry.value.strip()
        problem = _entry_problem(kind, alias, target)
        if problem is None and REGISTRY[kind].get(alias) == target:
            continue  # the same backend twice (e.g. an editable install next to a wheel)
        if problem is None and alias in REGISTRY[kind]:
            problem = f"{kind[:-1]} {alias!r} is already registered as {REGISTRY[kind][alias]!r}"
        if problem:
            logger.warning("ignoring entry point %r = %r of %s in group %s (name it '<kind>.<alias>'): %s",
                           entry.name, entry.value, dist, ENTRY_POINT_GROUP, problem)
            continue
        REGISTRY[kind][alias] = target
        _ORIGINS[(kind, alias)] = f"entry point of {dist}"


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

    A spec ``package.module:Object`` whose left part is not a registered alias names user code,
    imported when the backend is built (see `backend_class`): spelled out, never guessed.

    Raises:
        ValueError: for an empty spec or an unknown alias, with a "did you mean" hint.
    """
    _check_kind(kind)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty {kind[:-1]} spec; allowed backends: {', '.join(available(kind))}")
    alias, sep, arg = spec.strip().partition(":")
    if alias not in REGISTRY[kind] and _is_user_code(spec.strip()):
        return Spec(kind=kind, alias=spec.strip(), arg=None, imported=True)
    if alias not in REGISTRY[kind]:
        close = difflib.get_close_matches(alias, REGISTRY[kind], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown {kind[:-1]} {alias!r} in spec {spec!r}.{hint} "
            f"Allowed: {', '.join(available(kind))}, or your own code as package.module:Object"
        )
    return Spec(kind=kind, alias=alias, arg=arg if sep and arg else None)


def backend_class(kind: str, spec: str) -> type:
    """Import and return the class that implements ``spec`` (an alias alone is a spec).

    Raises:
        ValueError: for an unknown spec.
        ImportError, AttributeError: when the registered ``"module:Object"`` cannot be imported.
    """
    parsed = parse_spec(kind, spec)
    if parsed.imported:
        return import_object(parsed.alias, kind)
    module_name, _, attr = REGISTRY[kind][parsed.alias].partition(":")
    return functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))


def _is_user_code(spec: str) -> bool:
    """``package.module:Object`` whose top-level package can be found (found, not imported)."""
    import importlib.util

    if not _IMPORT_SPEC.fullmatch(spec):
        return False
    _search_working_folder()
    return importlib.util.find_spec(spec.partition(":")[0].partition(".")[0]) is not None


def _search_working_folder() -> None:
    """Let user code in the working folder import, as under ``python -m`` (the console script lacks it)."""
    import os
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def import_object(target: str, kind: str) -> Any:
    """Import ``package.module:Object`` (user code named in a spec); the working folder is searched too,
    as ``python -m`` would.

    Raises:
        ValueError: when the module or the object cannot be imported, naming the registered aliases.
    """
    module_name, _, attr = target.partition(":")
    _search_working_folder()
    try:
        return functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError) as err:
        close = difflib.get_close_matches(module_name, REGISTRY[kind], n=1)
        hint = f" Did you mean the {kind[:-1]} {close[0]!r}?" if close else ""
        raise ValueError(f"cannot import {kind[:-1]} {target!r} ({type(err).__name__}: {err}).{hint} "
                         f"Registered: {', '.join(available(kind))}") from err


def check_options(kind: str, spec: str, options: dict[str, Any] | None = None) -> Spec:
    """Parse ``spec`` and check its options' names and values without building the backend (no model loads).

    Backends that can check cheaply define ``check_options(arg, **options)``; those whose ``from_spec``
    loads nothing say so with ``builds_cheaply = True`` and are built to check; the others are checked
    when they are built.

    Raises:
        ValueError: for an unknown spec, or an option the backend refuses (naming the option).
    """
    parsed = parse_spec(kind, spec)
    try:
        cls = backend_class(kind, spec)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{kind[:-1]} {spec!r} cannot be imported: {type(err).__name__}: {err}") from err
    if hasattr(cls, "check_options"):
        cls.check_options(parsed.arg, **(options or {}))
    elif getattr(cls, "builds_cheaply", False):
        cls.from_spec(parsed.arg, **(options or {}))
    return parsed


def build(obj: Any, arg: str | None, device: str, options: dict[str, Any]) -> Any:
    """A backend from what a spec names: ``from_spec(arg, device, **options)`` when the object has it,
    else a class called with no argument, else the object itself (an instance with the kind's methods).

    Raises:
        ValueError: for options given to an object that takes none.
    """
    if hasattr(obj, "from_spec"):
        return obj.from_spec(arg, device=device, **options)
    if options:
        raise ValueError(f"{obj!r} has no from_spec, so it takes no options; got {sorted(options)}")
    return obj() if isinstance(obj, type) else obj


@functools.lru_cache(maxsize=16)
def _load(kind: str, spec: str, device: str, options: tuple[tuple[str, Any], ...]) -> Any:
    parsed = parse_spec(kind, spec)
    return build(backend_class(kind, spec), parsed.arg, device, dict(options))


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


def unload_backends() -> None:
    """Drop every backend `load_backend` keeps, so the memory of their models can be freed.

    A process keeps each backend it builds, for reuse across chunks and stages. A notebook or script
    that runs a large instructor, editor and judge one after the other on one GPU calls this between
    stages (CUDA's cached blocks are released too); the next `load_backend` builds afresh.
    """
    import gc
    import sys

    _load.cache_clear()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
