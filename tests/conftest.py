"""Test set-up: never touch the network, keep every cache in a temp folder."""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="safetypairs-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_CACHE, "hf")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")
os.environ["TORCH_HOME"] = os.path.join(_CACHE, "torch")
os.environ["SAFETYPAIRS_NO_PROGRESS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")


import pytest  # noqa: E402 - after the environment set-up above


@pytest.fixture
def isolated_registry(monkeypatch):
    """Backend registries that a test may `register` into; restored (and the backend cache cleared) after it."""
    from safetypairs.backends import registry

    monkeypatch.setattr(registry, "REGISTRY", {kind: dict(aliases) for kind, aliases in registry.REGISTRY.items()})
    monkeypatch.setattr(registry, "_ORIGINS", dict(registry._ORIGINS))
    monkeypatch.setattr(registry, "_discovered", registry._discovered)
    registry._load.cache_clear()
    yield registry
    registry._load.cache_clear()
