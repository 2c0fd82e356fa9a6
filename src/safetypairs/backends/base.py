"""What every backend kind promises: result types and the Protocols of instructors, editors, classifiers, encoders."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, runtime_checkable

from safetypairs import schema as S

from safetypairs import statuses as ST

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy as np
    from PIL.Image import Image as PILImage

    from safetypairs.backends.options import Option
    from safetypairs.policy import Policy


@dataclass(frozen=True)
class InstructResult:
    """One instructor answer: the instruction, the targeted element, the raw output and a status."""

    instruction: str | None
    element: str | None = None
    raw: str = ""
    status: str = ST.OK
    error: str | None = None


@dataclass(frozen=True)
class Verdict:
    """A classifier's answer for one image.

    Attributes:
        label: ``"safe"``, ``"unsafe"`` or ``"unknown"`` (an answer that could not be parsed).
        score: higher means more unsafe (e.g. P(unsafe)); ``None`` when the backend has none.
        rationale: a short human-readable reason.
        raw: the backend's raw output (text or JSON), kept for audits.
        status: the row's status when the backend could not answer for this image (a word of `statuses`,
            e.g. ``api_error`` from a served model); ``None`` when it answered (parsable or not).
    """

    label: str
    score: float | None
    rationale: str
    raw: str
    status: str | None = None


def as_verdict(answer: Any) -> Verdict:
    """A classifier's answer as a `Verdict`: a `Verdict`, a label (``"safe"``/``"unsafe"``, 0/1, a bool:
    True = unsafe) or a ``(label, score)`` tuple, so a user guard may return plain labels.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(answer, Verdict):
        return answer
    label, score = answer if isinstance(answer, tuple) and len(answer) == 2 else (answer, None)
    if isinstance(label, (bool, int)) or type(label).__module__ == "numpy":
        label = S.UNSAFE if int(label) == 1 else S.SAFE if int(label) == 0 else S.UNKNOWN
    if not isinstance(label, str):
        raise TypeError(f"a classifier answered {answer!r}; expected a Verdict, a label or (label, score)")
    label = label.strip().lower()
    label = label if label in (S.SAFE, S.UNSAFE) else S.UNKNOWN
    return Verdict(label, None if score is None else float(score), "", str(answer))


@runtime_checkable
class Backend(Protocol):
    """What every backend class has: its options and a constructor from a spec.

    A spec reads ``alias[:<argument>][,key=value,...]``; `registry.parse_spec` reads it once. A backend declares,
    once, what its spec names and its options, and the registry checks them before any model loads, casts them
    and builds the backend with them; ``safetypairs backends`` prints the same declaration:

    - ``ARGUMENT`` (optional, not a Protocol member): an `options.Argument`, what the spec names before its
      options (a model id or path, a folder, a column); absent or ``None``: the spec carries options only.
    - ``OPTIONS``: option name -> `options.Option` (type, help, default, range). ``from_spec`` gets the checked
      argument (its default filled in) and every option, cast, its default filled in; keyword options win
      over the spec's own.

    A backend whose ``OPTIONS`` maps names to help texts (and that has no ``ARGUMENT``) keeps working as before:
    ``from_spec`` gets the spec's text after the alias as written and the keyword options as given (strings
    from the command line), checks them itself, and may offer ``check_options(arg, **options)`` that checks
    without loading.

    Attributes:
        OPTIONS: ``key=value`` option -> its `options.Option` (or, for a third-party backend, a help text).
    """

    OPTIONS: ClassVar[Mapping[str, Option | str]]

    @classmethod
    def from_spec(cls, arg: str | None, device: str = "cpu", **options: Any) -> Backend:
        """Build from the spec's argument (see above; ``None`` when the spec names none), a torch device and
        the options; a backend that checks its own options raises ValueError naming the allowed ones."""


@runtime_checkable
class Instructor(Backend, Protocol):
    """``instructors``: write one edit instruction per row."""

    def instruct(self, rows: list[dict[str, Any]], policy: Policy) -> list[InstructResult]:
        """One result per row (rows carry ``image``, ``category``, ``rationale``, ``source_id``)."""


@runtime_checkable
class Editor(Backend, Protocol):
    """``editors``: carry out one instruction per image.

    Attributes:
        takes_mask: ``edit`` accepts ``masks`` (white = edit); only such editors may be used with
            a mask column (`EditConfig.mask_column`).
    """

    takes_mask: ClassVar[bool]

    def edit(self, images: list[PILImage], instructions: list[str], seeds: list[int],
             masks: list[PILImage | None] | None = None) -> list[PILImage]:
        """One RGB image per input, exactly the input's size; random choices seeded by ``seeds``."""


@runtime_checkable
class Classifier(Backend, Protocol):
    """``judges`` and ``guards``: label each image safe or unsafe under a policy."""

    def classify(self, images: list[PILImage], categories: list[str | None], policy: Policy) -> list[Verdict]:
        """One `Verdict` per image (``categories``: the row's policy category, or ``None``)."""


@runtime_checkable
class Encoder(Backend, Protocol):
    """``encoders``: image models for validation metrics; each is an embedder or a distance map.

    Attributes:
        name: the metric name recorded in ``metrics_ran``.
    """

    name: str


@runtime_checkable
class EmbeddingEncoder(Encoder, Protocol):
    """An encoder that embeds images (CLIP)."""

    def embed(self, images: list[PILImage]) -> np.ndarray:
        """L2-normalised embeddings, shape ``(len(images), dim)``."""


@runtime_checkable
class DistanceEncoder(Encoder, Protocol):
    """An encoder that maps the perceptual distance of image pairs per pixel (LPIPS).

    Attributes:
        min_side: the smallest image side it accepts.
    """

    min_side: int

    def distance_maps(self, originals: list[np.ndarray], edited: list[np.ndarray]) -> list[np.ndarray]:
        """Per-pixel distance maps, one ``(H, W)`` array per pair of float ``(H, W, 3)`` images."""


# The Protocols a backend of each kind may implement (an encoder implements one of the two).
PROTOCOLS: dict[str, tuple[type, ...]] = {
    "instructors": (Instructor,),
    "editors": (Editor,),
    "judges": (Classifier,),
    "guards": (Classifier,),
    "encoders": (EmbeddingEncoder, DistanceEncoder),
}


def protocol_members(protocol: type, *, instance: bool = True) -> list[str]:
    """The public attributes and methods a Protocol declares (its bases' included), sorted.

    Args:
        protocol: one of this module's Protocols.
        instance: include the instance attributes (annotated without ``ClassVar``), which only an
            instance has; ``False`` gives what a class must have.
    """
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass in (Protocol, Generic, object):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
        names |= {n for n, hint in vars(klass).get("__annotations__", {}).items()
                  if instance or str(hint).startswith(("ClassVar", "typing.ClassVar"))}
    return sorted(names)


def _signature_gaps(backend: Any, protocol: type) -> list[str]:
    """Protocol parameters (required ones, and ``masks`` for an editor that takes masks) a method lacks."""
    gaps = []
    for name in protocol_members(protocol):
        declared = getattr(protocol, name, None)
        if not callable(declared) or name == "from_spec":
            continue
        params = inspect.signature(getattr(backend, name)).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        wanted = [p for p in list(inspect.signature(declared).parameters.values())[1:] if p.default is p.empty]
        if name == "edit" and getattr(backend, "takes_mask", False):
            wanted.append(inspect.signature(declared).parameters["masks"])
        gaps += [f"{name}({p.name})" for p in wanted if p.name not in params]
    return gaps


def missing_members(kind: str, backend: Any) -> list[str]:
    """What a backend class (or instance) lacks to implement its kind's Protocol; empty when it conforms.

    Checks every declared attribute and method and, for methods, the parameter names (a method
    taking ``**kwargs`` accepts any); a class is not asked for instance attributes (``name``,
    ``min_side``), an instance is. An encoder needs to satisfy one of the encoder Protocols.

    Args:
        kind: the backend kind.
        backend: the class or an instance.

    Returns:
        Missing names (``"classify"``, ``"edit(masks)"``...), for the closest Protocol.

    Raises:
        ValueError: for an unknown kind.
    """
    if kind not in PROTOCOLS:
        raise ValueError(f"unknown backend kind {kind!r}; allowed: {', '.join(PROTOCOLS)}")
    best: list[str] | None = None
    for protocol in PROTOCOLS[kind]:
        members = protocol_members(protocol, instance=not isinstance(backend, type))
        missing = [n for n in members if not hasattr(backend, n)]
        missing = missing or _signature_gaps(backend, protocol)
        if best is None or len(missing) < len(best):
            best = missing
    return best or []
