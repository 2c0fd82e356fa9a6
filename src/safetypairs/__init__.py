"""SafetyPairs: counterfactual image pairs that isolate safety-critical image features."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> defining module; imported on first use so `import safetypairs` stays light.
_EXPORTS = {
    "load_policy": "safetypairs.policy",
    "render_policy": "safetypairs.policy",
    "Policy": "safetypairs.policy",
    "compute_metrics": "safetypairs.metrics",
    "load": "safetypairs.hub",
    "push_release": "safetypairs.hub",
    "PushConfig": "safetypairs.hub",
    "assemble": "safetypairs.release",
    "write_release": "safetypairs.publish",
    "ReleaseConfig": "safetypairs.release",
    "Release": "safetypairs.release",
    "export_raw": "safetypairs.builder",
    "load_raw": "safetypairs.builder",
    "SafetyPairsRaw": "safetypairs.builder",
    "validate_pairs": "safetypairs.validate",
    "run_validate": "safetypairs.validate",
    "ValidateConfig": "safetypairs.validate",
    "select_best": "safetypairs.validate",
    "generate_pairs": "safetypairs.generate",
    "run_generate": "safetypairs.generate",
    "GenerateConfig": "safetypairs.generate",
    "RunConfig": "safetypairs.runner",
    "load_run": "safetypairs.runner",
    "InstructTransform": "safetypairs.instruct",
    "load_source": "safetypairs.sources",
    "SourceColumns": "safetypairs.sources",
    "score_file": "safetypairs.score",
    "ScoreConfig": "safetypairs.score",
    "EditTransform": "safetypairs.edit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safetypairs' has no attribute {name!r}")
