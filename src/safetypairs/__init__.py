"""SafetyPairs: counterfactual image pairs that isolate safety-critical image features."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> defining module; imported on first use so `import safetypairs` stays light.
# Entry points: `run_<stage>(dataset, config)` maps a stage in memory (this process, or num_proc map processes);
# `<stage>_run(input, config, run)` writes a resumable, sharded run folder (`RunConfig`) on the shared runner.
_EXPORTS = {
    "load_policy": "safetypairs.policy",
    "render_policy": "safetypairs.policy",
    "Policy": "safetypairs.policy",
    "compute_metrics": "safetypairs.evaluate.metrics",
    "load": "safetypairs.release.hub",
    "push_release": "safetypairs.release.hub",
    "PushConfig": "safetypairs.release.hub",
    "assemble": "safetypairs.release.assemble",
    "write_release": "safetypairs.release.publish",
    "ReleaseConfig": "safetypairs.release.assemble",
    "Release": "safetypairs.release.assemble",
    "export_raw": "safetypairs.release.builder",
    "load_raw": "safetypairs.release.builder",
    "SafetyPairsRaw": "safetypairs.release.builder",
    "validate_pairs": "safetypairs.validate.stage",
    "run_validate": "safetypairs.validate.stage",
    "validate_run": "safetypairs.validate.stage",
    "ValidateConfig": "safetypairs.validate.stage",
    "select_best": "safetypairs.validate.decision",
    "generate_pairs": "safetypairs.generate",
    "generate_run": "safetypairs.generate",
    "GenerateConfig": "safetypairs.generate",
    "RunConfig": "safetypairs.engine.runner",
    "load_run": "safetypairs.engine.runner",
    "InstructTransform": "safetypairs.instruct",
    "load_source": "safetypairs.sources",
    "SourceColumns": "safetypairs.sources",
    "score_file": "safetypairs.evaluate.score",
    "ScoreConfig": "safetypairs.evaluate.score",
    "EditTransform": "safetypairs.edit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safetypairs' has no attribute {name!r}")
