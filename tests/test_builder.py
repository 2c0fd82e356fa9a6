"""Raw release layout: export_raw writes it, SafetyPairsRaw (a GeneratorBasedBuilder) rebuilds the same rows."""

from __future__ import annotations

import json

import pytest
from release_rows import digest, validated_rows

from safetypairs import schema as S
from safetypairs.release.builder import METADATA, SafetyPairsRaw, export_raw, load_raw
from safetypairs.cli import main
from safetypairs.release.assemble import ReleaseConfig, assemble
from safetypairs.engine.folders import OutputDirError


def _rows(ds) -> list[dict]:
    return [{k: digest(v) if hasattr(v, "convert") else v for k, v in row.items()} for row in ds]


@pytest.fixture(scope="module")
def release():
    return assemble(validated_rows(n_sources=8), ReleaseConfig(split_by="source"))


@pytest.fixture(scope="module")
def raw(release, tmp_path_factory):
    return export_raw(release, tmp_path_factory.mktemp("raw") / "raw")


def test_builder_rebuilds_every_config(release, raw, tmp_path):
    rebuilt = load_raw(raw, cache_dir=tmp_path / "cache")
    assert set(rebuilt.configs) == set(release.configs)
    for name, splits in release.configs.items():
        assert list(rebuilt[name]) == list(splits)
        for split, ds in splits.items():
            assert rebuilt[name][split].features == ds.features
            assert _rows(rebuilt[name][split]) == _rows(ds), (name, split)


def test_builder_used_directly(raw, tmp_path):
    builder = SafetyPairsRaw(config_name="images", data_dir=str(raw), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    images = builder.as_dataset(split="test")
    assert images.features == S.IMAGE_FEATURES
    assert set(S.role_names(images[S.ROLE])) == {"original", "edited", "control"}
    with pytest.raises(ValueError, match="data_dir"):
        SafetyPairsRaw(config_name="pairs", cache_dir=str(tmp_path / "c2")).download_and_prepare()


def test_hand_edits_are_picked_up_and_released(raw, tmp_path):
    edited = tmp_path / "edited"
    export_raw(load_raw(raw, cache_dir=tmp_path / "c0"), edited)
    lines = (edited / METADATA["pairs"]).read_text().splitlines()
    first = json.loads(lines[0])
    first[S.CATEGORY] = "O9"
    (edited / METADATA["pairs"]).write_text("\n".join([json.dumps(first)] + lines[2:]) + "\n")  # drop one pair
    rebuilt = load_raw(edited, cache_dir=tmp_path / "c1")
    pairs = [r for split in rebuilt["pairs"].values() for r in split]
    assert len(pairs) == len(lines) - 1 and pairs[0][S.CATEGORY] == "O9"
    assert sum(len(ds) for ds in rebuilt["images"].values()) == sum(2 + (p[S.CONTROL_IMAGE] is not None) for p in pairs)
    out = tmp_path / "release"
    assert main(["-q", "release", str(edited), "--out", str(out)]) == 0
    assert "| O9 |" in (out / "README.md").read_text()


def test_export_refuses_non_empty_folder(release, raw):
    with pytest.raises(OutputDirError, match="not empty"):
        export_raw(release, raw)


def test_edits_after_a_first_load_are_not_hidden_by_the_cache(raw, tmp_path):
    edited = tmp_path / "edited"
    export_raw(load_raw(raw, cache_dir=tmp_path / "c0"), edited)
    before = load_raw(edited, cache_dir=tmp_path / "cache")
    lines = (edited / METADATA["pairs"]).read_text().splitlines()
    first = json.loads(lines[0])
    first[S.CATEGORY] = "O9"
    (edited / METADATA["pairs"]).write_text("\n".join([json.dumps(first)] + lines[2:]) + "\n")  # drop one pair
    after = load_raw(edited, cache_dir=tmp_path / "cache")  # same cache folder, as with the default cache
    pairs = [r for split in after["pairs"].values() for r in split]
    assert sum(len(ds) for ds in before["pairs"].values()) == len(lines)
    assert len(pairs) == len(lines) - 1 and pairs[0][S.CATEGORY] == "O9"


def _edited_copy(raw, tmp_path, change):
    """A copy of the raw layout whose first pairs line is changed by ``change(row)``."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(raw, copy)
    lines = (copy / METADATA["pairs"]).read_text().splitlines()
    first = json.loads(lines[0])
    change(first)
    (copy / METADATA["pairs"]).write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    return copy


@pytest.mark.parametrize("change, message", [
    (lambda row: row.update({S.UNSAFE_IMAGE: "../outside/secret.jpg"}), "unsafe_image '../outside/secret.jpg' is not a path inside"),
    (lambda row: row.update({S.EDIT_MASK: "/etc/passwd"}), "edit_mask '/etc/passwd' is not a path inside"),
    (lambda row: row.pop("split"), "line 1: expected a JSON object with a 'split'"),
])
def test_a_hostile_or_broken_raw_layout_is_one_line_and_embeds_nothing(raw, tmp_path, capsys, change, message):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(b"my private bytes")
    copy = _edited_copy(raw, tmp_path, change)
    assert main(["release", str(copy), "--out", str(tmp_path / "rel")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert "root:" not in err and "private" not in err and not (tmp_path / "rel").exists()


def test_a_missing_image_file_in_a_raw_layout_becomes_a_null_cell(raw, tmp_path, caplog):
    copy = _edited_copy(raw, tmp_path, lambda row: row.update({S.EDIT_MASK: "images/pairs/nope/mask.png"}))
    with caplog.at_level("WARNING"):
        rebuilt = load_raw(copy, cache_dir=tmp_path / "cache")
    first = [r for split in rebuilt["pairs"].values() for r in split if r[S.EDIT_MASK] is None]
    assert len(first) == 1 and "images/pairs/nope/mask.png" in caplog.text and "the cell is null" in caplog.text
