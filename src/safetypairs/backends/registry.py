"""Backend registries addressed by spec strings such as ``diffusers:<model id or path>,steps=20``, and the one
parser of those strings.

Every backend is named here by ``"module:Class"`` so that nothing heavy is imported until a
backend is built. A backend class implements ``from_spec(arg, device, **options)`` and the
Protocol of its kind (`safetypairs.backends.base`); it declares what its spec names (`options.Argument`) and
its options (`options.Option`) once, and `parse_spec` reads a spec into a `Spec` that every other module asks.
Other packages add backends with `register` or through the ``safetypairs.backends`` entry-point group
(name ``"<kind>.<alias>"``, value ``"module:Class"``), read on the first lookup.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import logging
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safetypairs.backends.options import Argument, Option, cast_options, parse_options
from safetypairs.usage import Usage

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
    "openai": "safetypairs.backends.served:ServedModel",
}

REGISTRY: dict[str, dict[str, str]] = {
    "instructors": {
        "template": "safetypairs.backends.template:TemplateInstructor",
        "column": "safetypairs.backends.template:ColumnInstructor",
        "hf-vlm": "safetypairs.backends.vlm_instruct:HFVLMInstructor",
        "openai": "safetypairs.backends.served:ServedModel",
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
_LIVE: weakref.WeakValueDictionary[tuple[Any, ...], Any] = weakref.WeakValueDictionary()  # see `loaded_backends`


@dataclass(frozen=True)
class Spec:
    """A backend spec read once: ``alias[:<argument>][,key=value,...]``.

    Attributes:
        kind: the backend kind.
        alias: the registered name; for user code (``package.module:Object``) the whole spec.
        arg: everything after the first colon, as written (``None`` when absent).
        model: what the spec names before its options, when the backend declares an `options.Argument`: a model
            id or path, a probe folder, an encoder spec, a column (the text before the first comma); ``None``
            when absent or when the backend takes options only.
        options: the spec's ``key=value`` options as written (text; `from_spec_arguments` casts them).
        imported: the spec names user code.
        hub: ``model`` is a Hugging Face hub id or a local ``save_pretrained`` folder.

    A backend that declares neither an ``ARGUMENT`` nor `options.Option` records (a plain ``OPTIONS`` of help
    texts) gets ``arg`` as written: its ``model`` is ``None`` and its ``options`` empty.
    """

    kind: str
    alias: str
    arg: str | None
    model: str | None = None
    options: Mapping[str, str] = field(default_factory=dict, hash=False)
    imported: bool = False
    hub: bool = False

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
    """Read a spec ``alias[:<argument>][,key=value,...]`` once, as its backend declares it.

    Args:
        kind: the backend kind.
        spec: e.g. ``"template"``, ``"diffusers:timbrooks/instruct-pix2pix,steps=20"``,
            ``"ocr-lexicon:box_thresh=0.3"``, ``"clip-zeroshot:open_clip:ViT-B-32/openai,threshold=0.1"``.

    Returns:
        The parsed `Spec`: its alias, its model (the declared `options.Argument`, the text before the first comma;
        a path may hold ``:`` but not ``,``) and its ``key=value`` options as text.

    A spec ``package.module:Object`` whose left part is not a registered alias names user code,
    imported when the backend is built (see `backend_class`): spelled out, never guessed.

    Raises:
        ValueError: for an empty spec, an unknown alias (with a "did you mean" hint), a registered backend that
            cannot be imported, or options that are not ``key=value`` items.
    """
    _check_kind(kind)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty {kind[:-1]} spec; allowed backends: {', '.join(available(kind))}")
    text = spec.strip()
    alias, sep, arg = text.partition(":")
    if alias not in REGISTRY[kind] and _is_user_code(text):
        return Spec(kind=kind, alias=text, arg=None, imported=True)
    if alias not in REGISTRY[kind]:
        close = difflib.get_close_matches(alias, REGISTRY[kind], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown {kind[:-1]} {alias!r} in spec {spec!r}.{hint} "
            f"Allowed: {', '.join(available(kind))}, or your own code as package.module:Object"
        )
    arg = arg if sep and arg else None
    cls = _registered(kind, alias)
    if not declares_options(cls):
        return Spec(kind=kind, alias=alias, arg=arg)
    argument: Argument | None = getattr(cls, "ARGUMENT", None)
    try:
        model, options = _split(alias, arg, argument, bool(getattr(cls, "OPTIONS", None)))
    except ValueError as err:
        ends = f" ({argument.usage} ends at the first ',')" if argument is not None else ""
        raise ValueError(f"{kind[:-1]} spec {spec!r}: {err}{ends}") from err
    return Spec(kind=kind, alias=alias, arg=arg, model=model, options=options, hub=bool(argument and argument.hub))


def _split(alias: str, arg: str | None, argument: Argument | None,
           has_options: bool) -> tuple[str | None, dict[str, str]]:
    """The model and the ``key=value`` options of a spec's text after the alias, as the backend declares them."""
    if not arg:
        return None, {}
    head, _, rest = arg.partition(",")
    if argument is None and "=" not in head:
        takes = f"key=value options only ({alias}[:key=value,...])" if has_options else "no argument and no options"
        raise ValueError(f"{alias} takes {takes}, got {head!r}")
    if argument is None or (argument.default is not None and "=" in head):
        return None, parse_options(arg)
    return head.strip() or None, parse_options(rest)


def declares_options(obj: Any) -> bool:
    """Whether a backend declares what its spec names and its options (an ``ARGUMENT``, `options.Option` records),
    so the registry checks and casts them; else (``OPTIONS`` of help texts) it gets its spec's text as written.

    Raises:
        ValueError: for ``OPTIONS`` that mix `options.Option` records with help texts.
    """
    entries = list((getattr(obj, "OPTIONS", None) or {}).values())
    typed = [isinstance(entry, Option) for entry in entries]
    if any(typed) and not all(typed):
        raise ValueError(f"{obj!r}: OPTIONS mixes Option records with help texts; declare every option as an Option")
    return hasattr(obj, "ARGUMENT") or any(typed)


def _registered(kind: str, alias: str) -> Any:
    """The object a registered alias names, imported.

    Raises:
        ValueError: when its ``"module:Object"`` cannot be imported (naming the error).
    """
    target = REGISTRY[kind][alias]
    module_name, _, attr = target.partition(":")
    try:
        return functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{kind[:-1]} {alias!r} ({target}) cannot be imported: {type(err).__name__}: {err}") from err


def backend_class(kind: str, spec: str) -> Any:
    """Import and return the class (or object, for user code) that implements ``spec`` (an alias alone is a spec).

    Raises:
        ValueError: for an unknown spec, or one whose code cannot be imported.
    """
    return _resolve(kind, spec)[1]


def _resolve(kind: str, spec: str) -> tuple[Spec, Any]:
    """The parsed spec and the object it names (user code imported)."""
    parsed = parse_spec(kind, spec)
    return parsed, import_object(parsed.alias, kind) if parsed.imported else _registered(kind, parsed.alias)


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


def from_spec_arguments(kind: str, spec: str,
                        options: Mapping[str, Any] | None = None) -> tuple[str | None, dict[str, Any]]:
    """What the backend's ``from_spec`` (and a capability such as ``roundtrip_reference``) gets for ``spec``.

    Args:
        kind: the backend kind.
        spec: the spec string.
        options: keyword options; they win over the spec's own.

    Returns:
        For a backend that declares its options: the checked model (the `options.Argument`, its default filled
        in) and every option cast, defaults filled in. For one that does not: the spec's text after the alias
        as written and the keyword options as given.

    Raises:
        ValueError: for an unknown spec, a missing or bad model, or an option the declaration refuses (naming
            the option, the value and what is allowed).
    """
    return _arguments(*_resolve(kind, spec), options or {})


def _arguments(parsed: Spec, obj: Any, options: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    if not declares_options(obj):
        return parsed.arg, dict(options)
    argument: Argument | None = getattr(obj, "ARGUMENT", None)
    model = None if argument is None else argument.check(parsed.alias, parsed.model)
    return model, cast_options(parsed.alias, {**parsed.options, **options}, getattr(obj, "OPTIONS", None) or {})


def model_info(kind: str, spec: str) -> dict[str, Any]:
    """The model and revision a spec names, for a run's provenance.

    Args:
        kind: the backend kind.
        spec: the spec string.

    Returns:
        ``{"spec"}``, plus ``model`` and ``revision`` when the backend names a hub model (``hf-vlm:``,
        ``diffusers:``, ...): ``"local"`` for a folder, the hub cache's commit, or ``None`` when not cached (or
        when the model is neither a folder nor a hub id).

    Raises:
        ValueError: for an unknown spec.
    """
    import os
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    parsed = parse_spec(kind, spec)
    if not (parsed.hub and parsed.model):
        return {"spec": spec}
    model = parsed.model
    if os.path.isdir(model):
        return {"spec": spec, "model": os.path.abspath(model), "revision": "local"}
    for name in ("model_index.json", "config.json"):
        try:
            cached = try_to_load_from_cache(model, name)
        except ValueError:  # neither a folder nor a hub id (HFValidationError): nothing is cached
            break
        if isinstance(cached, str):  # .../snapshots/<commit>/<name>
            return {"spec": spec, "model": model, "revision": Path(cached).parent.name}
    return {"spec": spec, "model": model, "revision": None}


def check_options(kind: str, spec: str, options: Mapping[str, Any] | None = None) -> Spec:
    """Parse ``spec`` and check its model and options without building the backend (no model loads).

    A backend that declares its options is checked against the declaration, then by its own
    ``check_options(model, **values)`` when it has more to check (e.g. a nested spec); one that does not is
    checked by its ``check_options(arg, **options)`` when it has one, else when it is built.

    Returns:
        The parsed `Spec`.

    Raises:
        ValueError: for an unknown spec, or a model or an option the backend refuses (naming the option).
    """
    parsed, obj = _resolve(kind, spec)
    arg, values = _arguments(parsed, obj, options or {})
    if hasattr(obj, "check_options"):
        obj.check_options(arg, **values)
    return parsed


def check_ready(kind: str, spec: str, options: Mapping[str, Any] | None = None) -> Spec:
    """`check_options`, then the backend's own ``check_ready(model, **values)`` when it has one: what must hold
    before any row is worked on and cannot be seen in the spec (a served model's server answers and serves it).
    The stage configs call this; `check_options` itself never touches the network.

    Returns:
        The parsed `Spec`.

    Raises:
        ValueError: as `check_options`, or naming what is not ready and how to fix it.
    """
    parsed = check_options(kind, spec, options)
    _, obj = _resolve(kind, spec)
    if hasattr(obj, "check_ready"):
        arg, values = _arguments(parsed, obj, options or {})
        obj.check_ready(arg, **values)
    return parsed


def build_backend(kind: str, spec: str, device: str = "cpu", **options: Any) -> Any:
    """Build a backend afresh (`load_backend` keeps the ones it builds).

    A backend that declares its options gets its checked model and every option cast (`from_spec_arguments`);
    user code without ``from_spec`` is a class called with no argument, or the object itself (an instance with
    the kind's methods).

    Args:
        kind: the backend kind.
        spec: the spec string.
        device: torch device string for backends that use one.
        **options: keyword options (they win over the spec's own).

    Returns:
        The backend instance.

    Raises:
        ValueError: for an unknown spec, a bad model or option, or options given to an object that takes none.
    """
    parsed, obj = _resolve(kind, spec)
    arg, values = _arguments(parsed, obj, options)
    if hasattr(obj, "from_spec"):
        return obj.from_spec(arg, device=device, **values)
    if values:
        raise ValueError(f"{obj!r} has no from_spec, so it takes no options; got {sorted(values)}")
    return obj() if isinstance(obj, type) else obj


@functools.lru_cache(maxsize=16)
def _load(kind: str, spec: str, device: str, options: tuple[tuple[str, Any], ...]) -> Any:
    backend = build_backend(kind, spec, device, **dict(options))
    try:
        _LIVE[(kind, spec, device, options)] = backend
    except TypeError:  # an object that takes no weak reference is not counted (it has no usage to report)
        pass
    return backend


def loaded_backends() -> list[tuple[str, str, Any]]:
    """``(kind, spec, backend)`` of every backend `load_backend` built that is still alive in this process
    (kept by its cache or by a caller): what holds memory now."""
    return [(key[0], key[1], backend) for key, backend in list(_LIVE.items())]


def usage_counts() -> dict[tuple[str, str], Usage]:
    """What each live backend with a `Usage` counter (served models) has sent and got so far, by ``(kind, spec)``.

    The runner reads these before and after each chunk and keeps the difference (`engine.runner.run_stage`).
    """
    counts: dict[tuple[str, str], Usage] = {}
    for kind, spec, backend in loaded_backends():
        usage = getattr(backend, "usage", None)
        if isinstance(usage, Usage):
            counts[(kind, spec)] = counts.get((kind, spec), Usage()) + usage
    return counts


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
