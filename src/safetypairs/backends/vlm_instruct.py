"""Instructor ``hf-vlm:<id or path>``: a chat VLM writes a policy-aware, replacing edit instruction."""

from __future__ import annotations

import ast
import json
import logging
import re
from typing import Any

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.backends.base import InstructResult
from safetypairs.backends.options import HUB_MODEL, Option
from safetypairs.backends.vlm import DTYPES, VLMConfig, load_vlm
from safetypairs.images import load_image
from safetypairs.policy import Policy, render_policy
from safetypairs.utils import Range

logger = logging.getLogger(__name__)

PROMPT = """You write edit instructions for an image-safety dataset.
This image violates the following category of the safety policy {policy_id}:

{policy_text}
{rationale}
Write ONE minimal edit instruction for an instruction-based image editor. The edit must REPLACE the \
violating element with a benign element of similar size, position and style (do not just delete it \
or leave an empty area), so that the image no longer violates the category. Everything else \
(people, background, layout, lighting, colours, style) must stay unchanged.
Answer with JSON only: {{"instruction": "<the edit instruction>", "element": "<the violating element>", \
"caption": "<one sentence describing the image>"}}"""

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_FIELD = r'["\']{name}["\']\s*:\s*"((?:[^"\\]|\\.)*)"'


class UnparsableAnswer(ValueError):
    """The VLM's answer holds no usable JSON instruction."""


def build_prompt(row: dict[str, Any], policy: Policy) -> str:
    """The instructor prompt for one row: its category's policy text and its rationale, if any."""
    rationale = (row.get(S.RATIONALE) or "").strip()
    return PROMPT.format(
        policy_id=policy.id,
        policy_text=render_policy(policy, [row[S.CATEGORY]]),
        rationale=f"\nWhy this image is unsafe: {rationale}\n" if rationale else "",
    )


def _json_objects(text: str) -> list[str]:
    """Balanced top-level ``{...}`` blocks of ``text``, ignoring braces inside JSON strings."""
    blocks, depth, start, in_string, escaped = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            start = i if depth == 0 else start
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                blocks.append(text[start:i + 1])
    return blocks


def _load_object(block: str) -> Any:
    """JSON, or a Python-literal dict (single quotes), or ``None``."""
    try:
        return json.loads(block, strict=False)  # strict=False: raw newlines inside strings
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(block)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def parse_answer(text: str) -> dict[str, str]:
    """Read ``{"instruction", "element", "caption"}`` from a VLM answer.

    Accepts code fences, prose around the JSON, single-quoted keys and, as a last resort,
    a truncated object whose ``"instruction"`` string is complete.

    Args:
        text: the raw answer.

    Returns:
        ``instruction`` (non-empty) plus ``element`` and ``caption`` when present.

    Raises:
        UnparsableAnswer: when no non-empty instruction can be read.
    """
    fenced = _FENCE.findall(text or "")
    for candidate in [*fenced, text or ""]:
        for block in _json_objects(candidate):
            data = _load_object(block)
            if isinstance(data, dict) and isinstance(data.get("instruction"), str) and data["instruction"].strip():
                return {k: str(data[k]).strip() for k in ("instruction", "element", "caption")
                        if isinstance(data.get(k), (str, int, float)) and str(data[k]).strip()}
    found = {}
    for name in ("instruction", "element", "caption"):
        match = re.search(_FIELD.format(name=name), text or "")
        if match:
            try:
                value = json.loads(f'"{match.group(1)}"', strict=False).strip()
            except json.JSONDecodeError:  # an invalid escape such as \x: keep the text as written
                value = match.group(1).strip()
            if value:
                found[name] = value
    if "instruction" not in found:
        raise UnparsableAnswer(f"no JSON object with a non-empty 'instruction' in the answer {(text or '')[:200]!r}")
    return found


class HFVLMInstructor:
    """``hf-vlm:<model id or local path>``: any transformers image-text-to-text chat model.

    The prompt carries the policy text of the row's category and its rationale and asks for the
    minimal edit that replaces the violating element; the JSON answer is parsed robustly, the
    raw text is kept, and an unparsable answer becomes an ``unparsable`` status row.
    """

    ARGUMENT = HUB_MODEL
    OPTIONS = {
        "dtype": Option(DTYPES, "torch dtype (auto: bfloat16 on CUDA, float32 on the CPU)", "auto"),
        "trust_remote_code": Option(bool, "allow custom model code from the repo", False),
        "revision": Option(str, "hub revision: branch, tag or commit (unset: the default branch)"),
        "max_new_tokens": Option(int, "answer length in tokens", 160, Range(1)),
    }

    def __init__(self, vlm: Any, max_new_tokens: int) -> None:
        self.vlm = vlm
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_spec(cls, arg: str, device: str = "cpu", **options: Any) -> "HFVLMInstructor":
        """Load the VLM ``arg`` through the shared runtime (`safetypairs.backends.vlm`).

        Args:
            arg: a hub model id or a local folder.
            device: torch device string.
            **options: every option of `OPTIONS`, checked and cast by the registry.
        """
        config = VLMConfig(model=arg, device=device, dtype=options["dtype"],
                           trust_remote_code=options["trust_remote_code"], revision=options["revision"])
        return cls(load_vlm(config), options["max_new_tokens"])

    def instruct(self, rows: list[dict[str, Any]], policy: Policy) -> list[InstructResult]:
        """One greedy answer per row, parsed into an instruction (or an ``unparsable`` status)."""
        images = [load_image(row[S.IMAGE]) for row in rows]
        prompts = [build_prompt(row, policy) for row in rows]
        answers = self.vlm.generate(images, prompts, max_new_tokens=self.max_new_tokens)
        return [self._result(answer) for answer in answers]

    @staticmethod
    def _result(answer: str) -> InstructResult:
        try:
            parsed = parse_answer(answer)
        except UnparsableAnswer as err:
            return InstructResult(None, None, answer, ST.UNPARSABLE, str(err))
        return InstructResult(parsed["instruction"], parsed.get("element"), answer)
