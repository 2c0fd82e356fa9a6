"""Backend registry: spec parsing, did-you-mean errors, lazy loading and caching."""

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from safetypairs.backends.options import (
    Argument,
    Option,
    cast_options,
    option_help,
    parse_bool,
    parse_options,
)
from safetypairs.backends.registry import (
    KINDS,
    available,
    build_backend,
    check_options,
    from_spec_arguments,
    load_backend,
    model_info,
    parse_spec,
    unload_backends,
)
from safetypairs.evaluate.caveats import backend_of
from safetypairs.validate.thresholds import LATENT_DIFFUSION, PIXEL_EXACT, preset_for_editor
from safetypairs.utils import Range, check_ranges

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_parse_spec_reads_alias_model_and_options():
    spec = parse_spec("guards", "ocr-lexicon:box_thresh=0.3")
    assert (spec.alias, spec.arg, spec.model, dict(spec.options)) == ("ocr-lexicon", "box_thresh=0.3", None,
                                                                        {"box_thresh": "0.3"})
    assert str(spec) == "ocr-lexicon:box_thresh=0.3"
    spec = parse_spec("editors", "diffusers: org/model , steps = 2,dtype=float16")
    assert (spec.model, dict(spec.options), spec.hub) == ("org/model", {"steps": "2", "dtype": "float16"}, True)
    template = parse_spec("instructors", "template")
    assert (template.arg, template.model, dict(template.options)) == (None, None, {})
    assert parse_spec("instructors", "column:my_instruction").model == "my_instruction"
    assert parse_spec("encoders", "lpips:pnet_rand=true").model is None  # an optional argument may be left out
    assert parse_spec("encoders", "lpips:vgg,pnet_rand=true").model == "vgg"


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


DEMO_OPTIONS = {"n": Option(int, "a count", 1), "x": Option(float, "a share", 0.5, Range(0, 1, open_low=True)),
                "flag": Option(bool, "a switch", False), "mode": Option(("a", "b"), "a mode", "a"),
                "name": Option(str, "a name (unset: none)")}


def test_cast_options_casts_and_names_what_is_wrong():
    types = DEMO_OPTIONS
    given = {"n": "3", "x": "0.25", "flag": "yes", "mode": "b", "name": 7}
    assert cast_options("demo", given, types) == {"n": 3, "x": 0.25, "flag": True, "mode": "b", "name": "7"}
    assert cast_options("demo", {}, types) == {"n": 1, "x": 0.5, "flag": False, "mode": "a", "name": None}
    assert cast_options("demo", {"name": "none"}, types)["name"] is None  # unset, as the default None is
    with pytest.raises(ValueError, match=r"unknown demo option\(s\) \['n'\]; demo takes no options"):
        cast_options("demo", {"n": "1"}, {})
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
        cast_options("demo", {"x": "2"}, types)
    with pytest.raises(ValueError, match=r"x=nan \(allowed: \(0, 1\]\)"):
        cast_options("demo", {"x": "nan"}, types)


def test_an_option_declaration_gives_its_help_line():
    assert option_help(DEMO_OPTIONS["x"]) == "a share [a number in (0, 1]; default 0.5]"
    assert option_help(DEMO_OPTIONS["n"]) == "a count [an integer; default 1]"
    assert option_help(DEMO_OPTIONS["flag"]) == "a switch [true or false; default false]"
    assert option_help(DEMO_OPTIONS["mode"]) == "a mode [one of a, b; default a]"
    assert option_help(DEMO_OPTIONS["name"]) == "a name (unset: none) [text]"
    assert option_help(Option(int, "steps", None, Range(1))) == "steps [an integer >= 1]"
    assert option_help("a third-party help text") == "a third-party help text"


def test_an_argument_declaration_checks_what_the_spec_names():
    assert Argument("<net>", default="alex", choices=("alex", "vgg")).check("lpips", None) == "alex"
    with pytest.raises(ValueError, match="unknown lpips <net> 'resnet'; allowed: alex, vgg"):
        Argument("<net>", default="alex", choices=("alex", "vgg")).check("lpips", "resnet")
    with pytest.raises(ValueError, match="diffusers needs <hub id or local path> after 'diffusers:'"):
        Argument("<hub id or local path>").check("diffusers", None)


def test_range_text_and_membership():
    assert [str(r) for r in (Range(0, 1), Range(0, 1, open_high=True), Range(0, open_low=True), Range(high=5),
                             Range(1, optional=True), Range())] == \
        ["[0, 1]", "[0, 1)", "> 0", "<= 5", ">= 1 or None", "any number"]
    assert 0 in Range(0, 1) and 0 not in Range(0, open_low=True) and 1 not in Range(0, 1, open_high=True)
    assert None in Range(optional=True) and None not in Range() and "1" not in Range() and True not in Range()
    with pytest.raises(ValueError, match=r"invalid thing value\(s\): a=-1 \(allowed: >= 0\); b=None"):
        check_ranges("thing", {"a": -1, "b": None, "c": 5}, {"a": Range(0), "b": Range(0), "c": Range(0)})


def test_from_spec_gets_the_checked_model_and_every_option_cast():
    assert from_spec_arguments("guards", "hf-vlm:org/model,dtype=bfloat16", {"max_new_tokens": "4"}) == (
        "org/model", {"dtype": "bfloat16", "max_new_tokens": 4, "trust_remote_code": False, "revision": None,
                      "scope": "all", "score": True})
    assert from_spec_arguments("guards", "nudenet:threshold=0.2", {"threshold": 0.7}) == (None, {"threshold": 0.7})
    assert from_spec_arguments("instructors", "template") == (None, {})
    for kind, spec, message in [
        ("editors", "diffusers:,steps=2", "diffusers needs <hub id or local path> after 'diffusers:'"),
        ("instructors", "column", "column needs <column name> after 'column:'"),
        ("instructors", "template:x=1", r"unknown template option\(s\) \['x'\]; template takes no options"),
        ("instructors", "template:fancy", "template takes no argument and no options, got 'fancy'"),
        ("guards", "ocr-lexicon:box_thresh", r"ocr-lexicon takes key=value options only \(ocr-lexicon\[:key=value"),
        ("editors", "diffusers:org/model,steps", "bad backend option 'steps'.*ends at the first ','"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_options(kind, spec)


# Specs that are easy to split wrongly, with what they name: (kind, spec, alias, model, options).
TRICKY_SPECS = [
    ("editors", "diffusers:/data/run:3/ip2p,steps=2", "diffusers", "/data/run:3/ip2p", {"steps": "2"}),
    ("editors", r"diffusers:C:\models\ip2p", "diffusers", r"C:\models\ip2p", {}),
    ("editors", "ocr-inpaint:match=0.9", "ocr-inpaint", None, {"match": "0.9"}),
    ("instructors", "hf-vlm:org/vlm:v2,max_new_tokens=8", "hf-vlm", "org/vlm:v2", {"max_new_tokens": "8"}),
    ("encoders", "hf-clip:org/model,revision=abc", "hf-clip", "org/model", {"revision": "abc"}),
    ("guards", "llavaguard:org/model,scope=category", "llavaguard", "org/model", {"scope": "category"}),
    ("guards", "clip-zeroshot:open_clip:ViT-B-32/openai,threshold=0.1", "clip-zeroshot", "open_clip:ViT-B-32/openai",
     {"threshold": "0.1"}),
    ("judges", "linear-probe:/runs/probe=1:a,threshold=0.5", "linear-probe", "/runs/probe=1:a", {"threshold": "0.5"}),
    ("judges", "ocr-lexicon:box_thresh=0.3,mode=rec", "ocr-lexicon", None, {"box_thresh": "0.3", "mode": "rec"}),
]


@pytest.mark.parametrize("kind, spec, alias, model, options", TRICKY_SPECS, ids=[s[1] for s in TRICKY_SPECS])
def test_a_spec_is_split_in_one_place(kind, spec, alias, model, options):
    """Every module that needs a spec's parts asks the registry: the run's model record, the circularity check and
    the thresholds preset read the same alias and model as `parse_spec`."""
    parsed = parse_spec(kind, spec)
    assert (parsed.alias, parsed.model, dict(parsed.options)) == (alias, model, options)
    if kind in ("judges", "guards"):
        assert backend_of(spec, kind) == (alias, model)
    if kind == "editors":
        assert preset_for_editor(spec) == (LATENT_DIFFUSION if alias == "diffusers" else PIXEL_EXACT)
    if kind in ("editors", "instructors"):
        info = model_info(kind, spec)
        assert info["spec"] == spec and info.get("model") == (model if alias in ("diffusers", "hf-vlm") else None)


def test_a_comma_ends_the_model_and_user_code_names_itself(tmp_path, monkeypatch):
    for kind, spec in [("editors", "diffusers:/data/a,b/ip2p"), ("guards", "hf-vlm:/data/a,b")]:
        with pytest.raises(ValueError, match=r"bad backend option 'b.*'.*<hub id or local path> ends at the first ','"):
            parse_spec(kind, spec)
    assert backend_of("hf-vlm:/data/a,b") == ("hf-vlm:/data/a,b", None)  # not a spec this install reads
    assert preset_for_editor("diffusers:/data/a,b/ip2p") == PIXEL_EXACT
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "guards.py").write_text("class G:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parsed = parse_spec("guards", "my_pkg.guards:G")
    assert (parsed.alias, parsed.model, dict(parsed.options), parsed.imported) == ("my_pkg.guards:G", None, {}, True)
    assert backend_of("my_pkg.guards:G") == ("my_pkg.guards:G", None)
    assert preset_for_editor("my_pkg.guards:G") == PIXEL_EXACT
    assert model_info("editors", "my_pkg.guards:G") == {"spec": "my_pkg.guards:G"}
    assert backend_of("gone-guard:org/model", "judges") == ("gone-guard:org/model", None)  # a judge not installed


class HelpTextGuard:
    """A third-party guard whose OPTIONS are help texts: it gets its spec's text and keyword options as given."""

    OPTIONS = {"level": "how strict"}
    seen: list = []

    @classmethod
    def from_spec(cls, arg, device="cpu", **options):
        cls.seen.append((arg, options))
        return cls()

    def classify(self, images, categories, policy):
        return ["safe"] * len(images)


def test_a_backend_with_help_text_options_gets_its_spec_as_written(isolated_registry):
    isolated_registry.register("guards", "help-text", f"{__name__}:HelpTextGuard")
    parsed = parse_spec("guards", "help-text:any;grammar,level=3")
    assert (parsed.arg, parsed.model, dict(parsed.options)) == ("any;grammar,level=3", None, {})
    HelpTextGuard.seen.clear()
    build_backend("guards", "help-text:any;grammar,level=3", level="2")
    check_options("guards", "help-text", {"anything": "goes"})  # it checks its own options when it is built
    assert HelpTextGuard.seen == [("any;grammar,level=3", {"level": "2"})]


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
