"""What every backend kind promises: result types and the Protocols of instructors, editors, classifiers, encoders."""

from __future__ import annotations

from dataclasses import dataclass

from safetypairs import schema as S


@dataclass(frozen=True)
class InstructResult:
    """One instructor answer: the instruction, the targeted element, the raw output and a status."""

    instruction: str | None
    element: str | None = None
    raw: str = ""
    status: str = S.OK
    error: str | None = None


@dataclass(frozen=True)
class Verdict:
    """A classifier's answer for one image.

    Attributes:
        label: ``"safe"``, ``"unsafe"`` or ``"unknown"`` (an answer that could not be parsed).
        score: higher means more unsafe (e.g. P(unsafe)); ``None`` when the backend has none.
        rationale: a short human-readable reason.
        raw: the backend's raw output (text or JSON), kept for audits.
    """

    label: str
    score: float | None
    rationale: str
    raw: str
