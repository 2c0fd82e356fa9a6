"""Test set-up: never touch the network, keep every cache in a temp folder; under pytest-xdist one CPU share of
threads per worker and the longest files handed out first; under pytest-randomly hypothesis seeded from its seed and
torch's global generator reseeded per test like `random` and NumPy's."""

import os
import tempfile
import zlib

_CACHE = tempfile.mkdtemp(prefix="safetypairs-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_CACHE, "hf")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")
os.environ["TORCH_HOME"] = os.path.join(_CACHE, "torch")
os.environ["SAFETYPAIRS_NO_PROGRESS"] = "1"
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # an xdist worker: the cores are shared out, so workers do not oversubscribe
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
else:
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


# The files that take a minute or more of one worker (seconds in the README's run on 2 idle cores, 2026-12-04):
# benchmarks 235, validate 152, notebooks 147, your_data 118, generate 102, evaluate 91, runner 89, readme 86,
# demo 69. `--dist loadfile` hands each worker one file at a time, by default the files with the most tests first,
# so the notebooks (4 tests, 147 s) started last and ran alone on one core for two minutes. These go first (in the
# random order among themselves); the many short files then fill both workers up to the end.
LONG_FILES = frozenset({"test_benchmarks.py", "test_validate.py", "test_notebooks.py", "test_your_data.py",
                        "test_generate.py", "test_evaluate.py", "test_runner.py", "test_readme.py", "test_demo.py"})


@pytest.hookimpl(trylast=True)  # after pytest-randomly has settled the seed (in each xdist worker too)
def pytest_configure(config):
    """Seed hypothesis from pytest-randomly's seed, as ``--hypothesis-seed`` would (unless that is given): hypothesis
    otherwise draws from its own unseeded generator, so the printed seed would not replay its examples. Under
    ``--dist loadfile``, files are handed out in collection order (see `LONG_FILES`), not by their number of tests."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.getoption("hypothesis_seed", None) is None:
        from hypothesis import core

        core.global_force_seed = seed


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle, whose order each group keeps
def pytest_collection_modifyitems(items):
    """The files of `LONG_FILES` first, each group in the order it was collected in (random under pytest-randomly)."""
    items.sort(key=lambda item: item.path.name not in LONG_FILES)


def pytest_runtest_setup(item):
    """Reseed torch's global generator from the run's seed and the test's id, as pytest-randomly does for `random` and
    NumPy: a test that draws from it gets the same numbers whatever ran before it (and in whichever worker)."""
    seed = getattr(item.config.option, "randomly_seed", None)
    if isinstance(seed, int):  # pytest-randomly is on (`-p no:randomly` leaves torch alone)
        import torch  # imported here whether or not the test uses it, so its state never depends on who imported first

        torch.manual_seed((seed + zlib.crc32(item.nodeid.encode())) % 2**32)
