"""Backend registry: spec parsing, did-you-mean errors, lazy loading and caching."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from safetypairs.registry import (
    KINDS,
    available,
    load_backend,
    parse_bool,
    parse_options,
    parse_spec,
    split_model_arg,
)

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
    code = ("import sys, safetypairs, safetypairs.registry; "
            "heavy = [m for m in ('torch', 'datasets', 'rapidocr', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": SRC})


def test_backends_are_cached_per_spec():
    a = load_backend("judges", "ocr-lexicon:box_thresh=0.4")
    b = load_backend("judges", "ocr-lexicon:box_thresh=0.4")
    assert a is b and a.ocr.box_thresh == 0.4
    with pytest.raises(ValueError, match="allowed: box_thresh"):
        load_backend("judges", "ocr-lexicon:boxthresh=0.4")


def test_parse_bool_accepts_text_and_refuses_junk():
    assert parse_bool("Yes", "x") is True and parse_bool("0", "x") is False and parse_bool(True, "x") is True
    with pytest.raises(ValueError, match="option trust_remote_code expects true or false"):
        parse_bool("ture", "trust_remote_code")


def test_split_model_arg():
    assert split_model_arg("org/model,dtype=bfloat16", "hf-vlm") == ("org/model", {"dtype": "bfloat16"})
    assert split_model_arg(" /models/x ", "diffusers") == ("/models/x", {})
    with pytest.raises(ValueError, match="diffusers needs a model"):
        split_model_arg(",steps=2", "diffusers")
