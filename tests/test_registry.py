"""Backend registry: spec parsing, did-you-mean errors, lazy loading and caching."""

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from safetypairs.backends.options import (
    cast_options,
    parse_bool,
    parse_options,
    split_model_arg,
)
from safetypairs.backends.registry import (
    KINDS,
    available,
    load_backend,
    parse_spec,
    unload_backends,
)
from safetypairs.utils import Range, check_ranges

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_parse_spec_keeps_everything_after_first_colon():
    spec = parse_spec("guards", "ocr-lexicon:box_thresh=0.3")
    assert (spec.alias, spec.arg) == ("ocr-lexicon", "box_thresh=0.3")
    assert str(spec) == "ocr-lexicon:box_thresh=0.3"
    assert parse_spec("instructors", "template").arg is None


def test_unknown_alias_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'ocr-lexicon'"):
        parse_spec("guards", "ocr-lexicn")
    with pytest.raises(ValueError, match="Allowed:"):
        parse_spec("editors", "photoshop:cs6")
    with pytest.raises(ValueError, match="allowed: instructors"):
        parse_spec("painters", "x")
    with pytest.raises(ValueError, match="empty"):
        parse_spec("judges", " ")


def test_every_kind_has_backends():
    assert set(KINDS) == {"instructors", "editors", "judges", "guards", "encoders"}
    for kind in KINDS:
        assert available(kind), kind


def test_parse_options():
    assert parse_options("a=1, b=x") == {"a": "1", "b": "x"}
    assert parse_options(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_options("novalue")


def test_import_is_light():
    code = ("import sys, safetypairs, safetypairs.backends.registry; "
            "heavy = [m for m in ('torch', 'datasets', 'rapidocr', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": SRC})


def test_backends_are_cached_per_spec():
    a = load_backend("judges", "ocr-lexicon:box_thresh=0.4")
    b = load_backend("judges", "ocr-lexicon:box_thresh=0.4")
    assert a is b and a.ocr.box_thresh == 0.4
    with pytest.raises(ValueError, match="allowed: box_thresh"):
        load_backend("judges", "ocr-lexicon:boxthresh=0.4")


def test_unload_backends_lets_the_models_go():
    first = load_backend("instructors", "template")
    gone = weakref.ref(first)
    del first
    unload_backends()
    assert gone() is None  # nothing else held it: its memory is free
    again = load_backend("instructors", "template")
    assert again is load_backend("instructors", "template")  # cached again from here on


def test_parse_bool_accepts_text_and_refuses_junk():
    assert parse_bool("Yes", "x") is True and parse_bool("0", "x") is False and parse_bool(True, "x") is True
    with pytest.raises(ValueError, match="option trust_remote_code expects true or false"):
        parse_bool("ture", "trust_remote_code")


def test_cast_options_casts_and_names_what_is_wrong():
    types = {"n": int, "x": float, "flag": bool, "mode": ("a", "b"), "name": str}
    given = {"n": "3", "x": "0.5", "flag": "yes", "mode": "b", "name": 7}
    assert cast_options("demo", given, types) == {"n": 3, "x": 0.5, "flag": True, "mode": "b", "name": "7"}
    assert cast_options("demo", {}, types) == {}
    for options, message in [
        ({"size": "1"}, r"unknown demo option\(s\) \['size'\]; allowed: n, x, flag, mode, name"),
        ({"n": "1.5"}, "demo option n must be an integer, got '1.5'"),
        ({"n": 1.5}, "demo option n must be an integer, got 1.5"),
        ({"x": "big"}, "demo option x must be a number, got 'big'"),
        ({"flag": "maybe"}, "demo option flag must be true or false, got 'maybe'"),
        ({"mode": "c"}, "demo option mode must be one of a, b, got 'c'"),
    ]:
        with pytest.raises(ValueError, match=message):
            cast_options("demo", options, types)
    with pytest.raises(ValueError, match=r"invalid demo option value\(s\): x=2.0 \(allowed: \(0, 1\]\)"):
        cast_options("demo", {"x": "2"}, types, {"x": Range(0, 1, open_low=True)})
    with pytest.raises(ValueError, match=r"x=nan \(allowed: \(0, 1\]\)"):
        cast_options("demo", {"x": "nan"}, types, {"x": Range(0, 1, open_low=True)})


def test_range_text_and_membership():
    assert [str(r) for r in (Range(0, 1), Range(0, 1, open_high=True), Range(0, open_low=True), Range(high=5),
                             Range(1, optional=True), Range())] == \
        ["[0, 1]", "[0, 1)", "> 0", "<= 5", ">= 1 or None", "any number"]
    assert 0 in Range(0, 1) and 0 not in Range(0, open_low=True) and 1 not in Range(0, 1, open_high=True)
    assert None in Range(optional=True) and None not in Range() and "1" not in Range() and True not in Range()
    with pytest.raises(ValueError, match=r"invalid thing value\(s\): a=-1 \(allowed: >= 0\); b=None"):
        check_ranges("thing", {"a": -1, "b": None, "c": 5}, {"a": Range(0), "b": Range(0), "c": Range(0)})


def test_split_model_arg():
    assert split_model_arg("org/model,dtype=bfloat16", "hf-vlm") == ("org/model", {"dtype": "bfloat16"})
    assert split_model_arg(" /models/x ", "diffusers") == ("/models/x", {})
    with pytest.raises(ValueError, match="diffusers needs a model"):
        split_model_arg(",steps=2", "diffusers")


class InvertEditor:
    """A third-party editor for these tests: inverts each image."""

    OPTIONS: dict = {}
    takes_mask = False

    @classmethod
    def from_spec(cls, arg, device="cpu", **options):
        return cls()

    def edit(self, images, instructions, seeds, masks=None):
        from PIL import ImageOps

        return [ImageOps.invert(im.convert("RGB")) for im in images]


def test_register_adds_a_backend_by_spec(isolated_registry):
    from safetypairs.backends.registry import backend_class, origin, register

    register("editors", "invert-test", f"{__name__}:InvertEditor")
    assert "invert-test" in available("editors") and origin("editors", "invert-test") == "register()"
    assert backend_class("editors", "invert-test:anything") is InvertEditor
    assert isinstance(load_backend("editors", "invert-test"), InvertEditor)
    register("editors", "invert-test", f"{__name__}:InvertEditor")  # the same target again: a no-op
    assert origin("editors", "ocr-inpaint") == "built-in"


def test_register_refuses_bad_input_and_silent_replacement(isolated_registry):
    from safetypairs.backends.registry import register

    with pytest.raises(ValueError, match="unknown backend kind 'editor'; allowed: instructors"):
        register("editor", "x", f"{__name__}:InvertEditor")
    with pytest.raises(ValueError, match="bad alias 'my:editor'"):
        register("editors", "my:editor", f"{__name__}:InvertEditor")
    with pytest.raises(ValueError, match="bad target 'test_registry.InvertEditor'; expected 'module:Object'"):
        register("editors", "x", "test_registry.InvertEditor")
    with pytest.raises(ValueError, match="'ocr-inpaint' is already registered as .*built-in.*replace=True"):
        register("editors", "ocr-inpaint", f"{__name__}:InvertEditor")
    before = load_backend("editors", "ocr-inpaint")
    register("editors", "ocr-inpaint", f"{__name__}:InvertEditor", replace=True)
    assert isinstance(load_backend("editors", "ocr-inpaint"), InvertEditor) and not isinstance(before, InvertEditor)


PLUGIN = '''
from PIL import ImageOps


class MirrorEditor:
    """Mirrors each image (a stand-in for another package's editor)."""

    OPTIONS = {}
    takes_mask = False

    @classmethod
    def from_spec(cls, arg, device="cpu", **options):
        return cls()

    def edit(self, images, instructions, seeds, masks=None):
        return [ImageOps.mirror(im.convert("RGB")) for im in images]
'''
ENTRY_POINTS = """[safetypairs.backends]
editors.mirror-plugin = sp_plugin_backends:MirrorEditor
editors.ocr-inpaint = sp_plugin_backends:MirrorEditor
painters.mirror = sp_plugin_backends:MirrorEditor
guards.no-target = sp_plugin_backends
"""


def _install_plugin(root: Path) -> Path:
    """A real installed distribution: a module and its dist-info (METADATA + entry_points.txt) on a path entry."""
    (root / "sp_plugin_backends.py").write_text(PLUGIN)
    info = root / "sp_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sp-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def test_entry_point_backends_are_discovered_on_first_lookup(tmp_path, monkeypatch, isolated_registry, caplog):
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from PIL import ImageOps

    from safetypairs import schema as S
    from safetypairs.edit import EditConfig, run_edit
    from safetypairs.backends.registry import origin
    from safetypairs.sources import build_demo_source

    monkeypatch.syspath_prepend(str(_install_plugin(tmp_path)))
    isolated_registry._discovered = False
    with caplog.at_level("WARNING", logger="safetypairs.backends.registry"):
        assert "mirror-plugin" in available("editors")
    assert origin("editors", "mirror-plugin") == "entry point of sp-plugin"
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "'editors.ocr-inpaint'" in warnings and "already registered" in warnings  # a built-in is not replaced
    assert "'painters.mirror'" in warnings and "unknown backend kind 'painters'" in warnings
    assert "'guards.no-target'" in warnings and "expected 'module:Object'" in warnings
    assert "painters" not in isolated_registry.REGISTRY and "no-target" not in available("guards")
    assert isolated_registry.REGISTRY["editors"]["ocr-inpaint"] == "safetypairs.backends.ocr_edit:OCRInpaintEditor"

    rows = build_demo_source(2).to_list()
    for row in rows:
        row.update({S.INSTRUCTION: "mirror it", S.INSTRUCT_STATUS: "ok"})
    source = Dataset.from_list(rows).cast_column(S.IMAGE, ImageFeature())
    out, result = run_edit(source, EditConfig(editor="mirror-plugin", control=False, device="cpu"))
    assert result.statuses == {"ok": 2}
    assert list(out[0][S.EDITED_IMAGE].getdata()) == list(ImageOps.mirror(out[0][S.IMAGE]).getdata())


def test_cli_lists_entry_point_backends_in_a_fresh_process(tmp_path):
    root = _install_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(root)])}
    proc = subprocess.run([sys.executable, "-m", "safetypairs", "backends", "editors"], capture_output=True,
                          text=True, env=env, check=True)
    assert "mirror-plugin  (entry point of sp-plugin: sp_plugin_backends:MirrorEditor)  [takes no mask]" in proc.stdout
    assert "Mirrors each image" in proc.stdout
    assert "ocr-inpaint  (built-in: safetypairs.backends.ocr_edit:OCRInpaintEditor)" in proc.stdout
    assert "ignoring entry point 'painters.mirror'" in proc.stderr


def test_user_code_specs_are_imported_only_when_spelled_out(tmp_path, monkeypatch):
    from safetypairs.backends.base import as_verdict
    from safetypairs.backends.registry import backend_class

    (tmp_path / "lab_guards").mkdir()
    (tmp_path / "lab_guards" / "__init__.py").write_text("")
    (tmp_path / "lab_guards" / "simple.py").write_text(
        "class Guard:\n    def classify(self, images, categories, policy):\n        return [(1, 0.9)] * len(images)\n"
        "INSTANCE = Guard()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_spec("guards", "lab_guards.simple:Guard")
    assert spec.imported and spec.alias == "lab_guards.simple:Guard" and spec.arg is None
    guard = load_backend("guards", "lab_guards.simple:Guard")
    assert as_verdict(guard.classify([None], [None], None)[0]).label == "unsafe"
    assert load_backend("guards", "lab_guards.simple:INSTANCE").classify([None], [None], None) == [(1, 0.9)]
    with pytest.raises(ValueError, match="cannot import guard 'lab_guards.simple:Nope'"):
        backend_class("guards", "lab_guards.simple:Nope")
    # a typo of a registered alias is not taken for user code
    with pytest.raises(ValueError, match="unknown guard 'ocr-lexicn'.*Did you mean 'ocr-lexicon'"):
        parse_spec("guards", "ocr-lexicn:box_thresh=0.3")
    with pytest.raises(ValueError, match="unknown guard 'nudnet'.*Did you mean 'nudenet'"):
        parse_spec("guards", "nudnet:threshold")
