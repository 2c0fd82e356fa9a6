"""Contract test: every registered backend implements its kind's Protocol (`backends.base`), declares its
argument and options completely (`options.Argument`, `options.Option`), and, built from a tiny configuration
through ``registry.load_backend``, honours its kind's interface on a real photo."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tiny_builders
from PIL import Image

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.backends.base import (
    PROTOCOLS,
    InstructResult,
    Verdict,
    missing_members,
)
from safetypairs.instructions import text_instruction
from safetypairs.policy import load_policy
from safetypairs.backends.options import Argument, Option, cast_options
from safetypairs.backends.registry import REGISTRY, backend_class, load_backend
from safetypairs.sources import demo_photo, render_demo_row

POLICY = load_policy("llavaguard")
SMALL = (45, 37)  # odd on purpose: editors must give back exactly the input size
INSTRUCTION_COLUMN = "my_instruction"


class TinyModels:
    """Tiny seeded random models, saved with ``save_pretrained`` on first use and kept for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stack = contextlib.ExitStack()  # servers started for the session, stopped with it

    @functools.cached_property
    def vlm(self) -> str:
        return tiny_builders.build_tiny_vlm(self.root / "vlm")

    @functools.cached_property
    def served(self) -> str:
        """A tiny VLM behind `transformers serve` (an OpenAI-compatible server on a free local port)."""
        from served_server import served

        model = tiny_builders.build_tiny_answering_vlm(self.root / "served-vlm")
        url = self.stack.enter_context(served(model, self.root / "serve.log"))
        return f"{model},base_url={url},cache=off"

    @functools.cached_property
    def shieldgemma2(self) -> str:
        return tiny_builders.build_tiny_shieldgemma2(self.root / "shieldgemma2")

    @functools.cached_property
    def ip2p(self) -> str:
        return tiny_builders.build_tiny_ip2p(self.root / "ip2p")

    @functools.cached_property
    def kontext(self) -> str:
        return tiny_builders.build_tiny_flux_kontext(self.root / "kontext")

    @functools.cached_property
    def hf_clip(self) -> str:
        return tiny_builders.build_tiny_hf_clip(self.root / "hf-clip")

    @functools.cached_property
    def open_clip(self) -> str:
        return tiny_builders.build_tiny_open_clip(self.root / "open_clip")

    @functools.cached_property
    def linear_probe(self) -> str:
        """A seeded random probe on the tiny open_clip's 32-dim embeddings."""
        from safetypairs.backends.probe import LinearProbe, save_probe

        coef = np.random.default_rng(0).normal(size=32).astype(np.float32)
        return str(save_probe(LinearProbe(coef, 0.1, f"open_clip:{self.open_clip}"), self.root / "probe"))


@dataclass(frozen=True)
class Tiny:
    """One tiny configuration: the spec (from the session's tiny models), ``load_backend`` options,
    and whether the backend needs the captioned demo photo (OCR backends) instead of a small photo."""

    spec: Callable[[TinyModels], str]
    options: dict[str, str] = field(default_factory=dict)
    captioned: bool = False


_CLASSIFIERS: dict[str, dict[str, Tiny]] = {
    "ocr-lexicon": {"default": Tiny(lambda t: "ocr-lexicon", captioned=True)},
    "nudenet": {"default": Tiny(lambda t: "nudenet")},
    "hf-vlm": {"tiny-llava": Tiny(lambda t: f"hf-vlm:{t.vlm},max_new_tokens=4")},
    "llavaguard": {"tiny-llava": Tiny(lambda t: f"llavaguard:{t.vlm},max_new_tokens=8")},
    "shieldgemma2": {"tiny-shieldgemma2": Tiny(lambda t: f"shieldgemma2:{t.shieldgemma2},scope=category")},
    "clip-zeroshot": {
        "open_clip": Tiny(lambda t: f"clip-zeroshot:open_clip:{t.open_clip}"),
        "hf-clip": Tiny(lambda t: f"clip-zeroshot:hf-clip:{t.hf_clip}"),
    },
    "linear-probe": {"tiny-open_clip": Tiny(lambda t: f"linear-probe:{t.linear_probe}")},
    "openai": {"transformers-serve": Tiny(lambda t: f"openai:{t.served}")},
}
_DIFFUSERS_OPTIONS = {"steps": "2", "resolution": "0"}

# (kind, alias) -> named tiny configurations. A new backend needs an entry here.
TINY: dict[tuple[str, str], dict[str, Tiny]] = {
    ("instructors", "template"): {"default": Tiny(lambda t: "template", captioned=True)},
    ("instructors", "column"): {"default": Tiny(lambda t: f"column:{INSTRUCTION_COLUMN}")},
    ("instructors", "hf-vlm"): {"tiny-llava": Tiny(lambda t: f"hf-vlm:{t.vlm}", {"max_new_tokens": "8"})},
    ("instructors", "openai"): {"transformers-serve": Tiny(lambda t: f"openai:{t.served}")},
    ("editors", "ocr-inpaint"): {"default": Tiny(lambda t: "ocr-inpaint", captioned=True)},
    ("editors", "diffusers"): {
        "ip2p": Tiny(lambda t: f"diffusers:{t.ip2p}", _DIFFUSERS_OPTIONS),
        "flux-kontext": Tiny(lambda t: f"diffusers:{t.kontext}", _DIFFUSERS_OPTIONS),
    },
    **{(kind, alias): configs for kind in ("judges", "guards") for alias, configs in _CLASSIFIERS.items()},
    ("encoders", "lpips"): {"random-alex": Tiny(lambda t: "lpips:alex,pnet_rand=true")},
    ("encoders", "open_clip"): {"tiny": Tiny(lambda t: f"open_clip:{t.open_clip}")},
    ("encoders", "hf-clip"): {"tiny": Tiny(lambda t: f"hf-clip:{t.hf_clip}")},
    ("encoders", "ocr-text"): {"default": Tiny(lambda t: "ocr-text:dim=64", captioned=True)},
}
REGISTERED = sorted((kind, alias) for kind, aliases in REGISTRY.items() for alias in aliases)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Iterator[TinyModels]:
    models = TinyModels(tmp_path_factory.mktemp("contract-tiny-models"))
    with models.stack:
        yield models


@functools.lru_cache(maxsize=1)
def _captioned_row() -> dict[str, Any]:
    """A real photo with a harassing caption (category O1), as the demo source makes it."""
    return render_demo_row(0, 0)


def _photo(config: Tiny) -> Image.Image:
    return _captioned_row()[S.IMAGE] if config.captioned else demo_photo("astronaut").resize(SMALL)


def _check_instructor(backend: Any, config: Tiny, alias: str) -> None:
    row = {**_captioned_row(), S.IMAGE: _photo(config), INSTRUCTION_COLUMN: "Replace the caption with a kind one"}
    results = backend.instruct([row], POLICY)
    assert len(results) == 1 and isinstance(results[0], InstructResult)
    result = results[0]
    assert isinstance(result.raw, str) and isinstance(result.status, str)
    if result.status == ST.OK:
        assert isinstance(result.instruction, str) and result.instruction.strip()
    else:
        assert result.instruction is None and result.error
    if alias in ("template", "column"):  # deterministic backends must succeed on this row
        assert result.status == ST.OK, result.error
    if alias == "column":
        assert result.instruction == row[INSTRUCTION_COLUMN]


def _check_editor(backend: Any, config: Tiny, alias: str) -> None:
    image = _photo(config)
    caption = json.loads(_captioned_row()[S.SOURCE_META])["text"]
    instruction = text_instruction([(caption, "HAVE A NICE DAY")])
    out = backend.edit([image], [instruction], [7])
    assert len(out) == 1 and isinstance(out[0], Image.Image)
    assert out[0].size == image.size and out[0].mode == "RGB"
    assert not np.array_equal(np.asarray(out[0]), np.asarray(image)), "the editor returned its input unchanged"


def _check_classifier(backend: Any, config: Tiny, alias: str) -> None:
    verdicts = backend.classify([_photo(config)], ["O1"], POLICY)
    assert len(verdicts) == 1 and isinstance(verdicts[0], Verdict)
    verdict = verdicts[0]
    assert verdict.label in (S.SAFE, S.UNSAFE, S.UNKNOWN)
    assert verdict.score is None or (isinstance(verdict.score, float) and math.isfinite(verdict.score))
    assert isinstance(verdict.rationale, str) and isinstance(verdict.raw, str)


def _check_encoder(backend: Any, config: Tiny, alias: str) -> None:
    image = _photo(config)
    if hasattr(backend, "distance_maps"):
        arr = np.asarray(image, dtype=np.float32) / 255.0
        same, changed = backend.distance_maps([arr, arr], [arr, arr[::-1].copy()])
        assert same.shape == changed.shape == arr.shape[:2]
        assert np.allclose(same, 0.0, atol=1e-6) and changed.mean() > 0.0
        return
    emb = backend.embed([image, image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)])
    assert emb.ndim == 2 and emb.shape[0] == 2 and emb.shape[1] > 0
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


CHECKS: dict[str, Callable[[Any, Tiny, str], None]] = {
    "instructors": _check_instructor,
    "editors": _check_editor,
    "judges": _check_classifier,
    "guards": _check_classifier,
    "encoders": _check_encoder,
}


def test_every_registered_backend_has_a_tiny_configuration():
    missing = sorted(set(REGISTERED) - set(TINY))
    stale = sorted(set(TINY) - set(REGISTERED))
    assert not missing, f"add a tiny configuration to TINY in tests/test_contract.py for {missing}"
    assert not stale, f"TINY in tests/test_contract.py names backends that are not registered: {stale}"
    assert set(CHECKS) == set(REGISTRY), "every backend kind needs a contract check in CHECKS"


@pytest.mark.parametrize("kind, alias", REGISTERED, ids=[f"{k}/{a}" for k, a in REGISTERED])
def test_backend_contract(kind, alias, tiny_models):
    assert (kind, alias) in TINY, f"add a tiny configuration for {kind}/{alias} to TINY in tests/test_contract.py"
    for name, config in TINY[(kind, alias)].items():
        spec = config.spec(tiny_models)
        backend = load_backend(kind, spec, device="cpu", **config.options)
        assert any(isinstance(backend, protocol) for protocol in PROTOCOLS[kind]), (spec, PROTOCOLS[kind])
        assert missing_members(kind, backend) == [], spec  # instance attributes (name, min_side) included
        try:
            CHECKS[kind](backend, config, alias)
        except AssertionError as err:
            raise AssertionError(f"{kind} backend {spec!r} ({name}) breaks the contract: {err}") from err


def test_shieldgemma2_scores_follow_image_and_policy(tiny_models):
    """The tiny ShieldGemma 2 really reads the image and each category's policy text."""
    guard = load_backend("guards", f"shieldgemma2:{tiny_models.shieldgemma2}")
    photos = [demo_photo("astronaut").resize(SMALL), demo_photo("chelsea").resize(SMALL)]
    first, second = guard.classify(photos, [None, None], POLICY)
    per_category = json.loads(first.raw)
    assert list(per_category) == list(POLICY.categories) and len(set(per_category.values())) > 1
    assert first.score == pytest.approx(max(per_category.values()), abs=1e-5)
    assert json.loads(second.raw) != per_category
    judge = load_backend("judges", f"shieldgemma2:{tiny_models.shieldgemma2},scope=category,score=false")
    only_o1, = judge.classify(photos[:1], ["O1"], POLICY)
    assert list(json.loads(only_o1.raw)) == ["O1"] and only_o1.score is None
    with pytest.raises(ValueError, match="shieldgemma2 option dtype must be one of auto, float32, float16, bfloat16"):
        load_backend("guards", f"shieldgemma2:{tiny_models.shieldgemma2},dtype=fp16")


# (kind, alias) -> a spec argument that passes `registry.check_options` although no such model exists.
OPTION_PROBE_ARG: dict[tuple[str, str], str | None] = {
    ("instructors", "template"): None,
    ("instructors", "column"): "my_instruction",
    ("instructors", "hf-vlm"): "some/model",
    ("instructors", "openai"): "some-model",
    ("editors", "ocr-inpaint"): None,
    ("editors", "diffusers"): "some/model",
    **{(kind, alias): arg for kind in ("judges", "guards") for alias, arg in {
        "ocr-lexicon": None, "nudenet": None, "hf-vlm": "some/model", "llavaguard": "some/model",
        "shieldgemma2": "some/model", "clip-zeroshot": "open_clip:ViT-B-32/none",
        "linear-probe": "some/probe", "openai": "some-model"}.items()},
    ("encoders", "lpips"): "alex",
    ("encoders", "open_clip"): "ViT-B-32/none",
    ("encoders", "hf-clip"): "some/model",
    ("encoders", "ocr-text"): None,
}


@pytest.mark.parametrize("kind, alias", REGISTERED, ids=[f"{k}/{a}" for k, a in REGISTERED])
def test_backend_class_implements_its_protocol(kind, alias):
    cls = backend_class(kind, alias)
    assert missing_members(kind, cls) == [], f"{cls.__name__} does not implement its {kind} Protocol"
    if kind == "editors":
        assert isinstance(cls.takes_mask, bool)


_TYPES = (int, float, bool, str)


@pytest.mark.parametrize("kind, alias", REGISTERED, ids=[f"{k}/{a}" for k, a in REGISTERED])
def test_backend_declares_its_argument_and_options_completely(kind, alias):
    """Each built-in backend declares, once, what its spec names and every option: a type, a one-line help, a
    default of that type inside its range (``None``: unset) and a range only on numbers."""
    cls = backend_class(kind, alias)
    assert hasattr(cls, "ARGUMENT"), f"{alias}: declare ARGUMENT (an Argument, or None for options only)"
    argument = cls.ARGUMENT
    if argument is not None:
        assert isinstance(argument, Argument) and argument.usage.strip() and "\n" not in argument.usage, alias
        assert argument.default is None or not argument.choices or argument.default in argument.choices, alias
    assert isinstance(cls.OPTIONS, dict), alias
    for name, option in cls.OPTIONS.items():
        where = f"{alias} option {name}"
        assert isinstance(option, Option), f"{where}: declare it as an Option, not {option!r}"
        assert option.type in _TYPES or (isinstance(option.type, tuple) and option.type
                                         and all(isinstance(t, str) for t in option.type)), where
        assert option.help.strip() and "\n" not in option.help, f"{where}: needs a one-line help"
        assert option.range is None or option.type in (int, float), f"{where}: a range is for numbers"
        if option.default is not None:  # the default is a value the option accepts, unchanged
            assert cast_options(alias, {name: option.default}, {name: option})[name] == option.default, where
            assert type(option.default) is (str if isinstance(option.type, tuple) else option.type), where


# Model libraries: `registry.check_options` must not import one (it runs before any work, loading nothing).
MODEL_LIBRARIES = ("torch", "transformers", "diffusers", "open_clip", "lpips", "rapidocr", "nudenet", "onnxruntime")
_CHECK_EVERY_SPEC = """
import json, sys
from safetypairs.backends.registry import check_options
refused = {}
for kind, spec in json.loads(sys.argv[1]):
    try:
        check_options(kind, spec, {"not_an_option": "1"})
        refused[f"{kind}/{spec}"] = None
    except ValueError as err:
        refused[f"{kind}/{spec}"] = str(err)
    check_options(kind, spec)  # the probe spec itself passes
print(json.dumps({"refused": refused, "imported": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def test_check_options_refuses_unknown_options_of_every_backend_before_any_model_loads():
    """The up-front check that generate / validate / evaluate run (`registry.check_options`) refuses an
    unknown option of every registered backend by name, accepts the probe spec (whose model does not
    exist, so a load would fail) and imports no model library on the way."""
    specs = [(kind, f"{alias}:{arg}" if (arg := OPTION_PROBE_ARG[(kind, alias)]) else alias) for kind, alias in REGISTERED]
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run([sys.executable, "-c", _CHECK_EVERY_SPEC, json.dumps(specs), json.dumps(MODEL_LIBRARIES)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    unchecked = sorted(spec for spec, error in result["refused"].items() if error is None or "not_an_option" not in error)
    assert not unchecked, f"check_options lets an unknown option through: {unchecked}"
    for (kind, alias), (spec, error) in zip(REGISTERED, result["refused"].items()):
        unnamed = [name for name in backend_class(kind, alias).OPTIONS if name not in error]
        assert not unnamed, f"{spec}: the refusal does not name the allowed options {unnamed}: {error}"
    assert result["imported"] == [], f"check_options imported model libraries: {result['imported']}"
