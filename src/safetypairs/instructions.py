"""Instruction text: the text-replacement grammar, the artifact-control no-op, benign phrases."""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources

import yaml

NOOP_INSTRUCTION = "Keep the image exactly as it is; change nothing."
# A closing quote is one not followed by a letter or another quote, so "IT'S" or "FRIENDS'" stay whole.
_REPLACE_TEXT = re.compile(r"""replace the text (['"])(?P<old>.+?)\1 with (['"])(?P<new>.*?)\3(?![\w'"])""",
                           re.IGNORECASE)



def text_replacements(instruction: str) -> list[tuple[str, str]]:
    """The ``(old, new)`` pairs of every "Replace the text 'X' with 'Y'" clause of an instruction."""
    return [(m["old"], m["new"]) for m in _REPLACE_TEXT.finditer(instruction or "")]


def text_instruction(replacements: list[tuple[str, str]]) -> str:
    """Write a text-replacement instruction that `text_replacements` parses back."""
    clauses = "; ".join(f"replace the text '{old}' with '{new}'" for old, new in replacements)
    return clauses[:1].upper() + clauses[1:] + "; keep everything else unchanged."


def noop_instruction(instruction: str) -> str:
    """The artifact-control instruction: re-render the same text, or ask for no change at all."""
    pairs = text_replacements(instruction)
    return text_instruction([(old, old) for old, _ in pairs]) if pairs else NOOP_INSTRUCTION


def closest_phrase(text: str, phrases: list[str], key: str) -> str:
    """The phrase closest in length to ``text``; ties broken by a stable hash of ``key``."""

    def rank(phrase: str) -> tuple[int, str]:
        return abs(len(phrase) - len(text)), hashlib.sha256(f"{key}:{phrase}".encode()).hexdigest()

    return min(phrases, key=rank)


@lru_cache(maxsize=1)
def demo_text() -> dict[str, list[str]]:
    """The demo's harassing captions and benign replacement phrases (``data/demo_text.yaml``)."""
    text = resources.files("safetypairs").joinpath("data/demo_text.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)
