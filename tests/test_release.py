"""Release assembly and the hub layout: best candidates, stable ids, grouped splits, plain load_dataset round trip."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from hostile_files import cmyk_icc, encode
from PIL import Image, ImageDraw
from release_rows import digest, photo, validated_rows

from safetypairs import schema as S
from safetypairs.cli import main
from safetypairs.engine import imagechecks
from safetypairs.engine.datafiles import data_files
from safetypairs.release.publish import read_input, write_release
from safetypairs.release.assemble import (
    ReleaseConfig,
    assemble,
    best_candidates,
    split_by_source,
)
from safetypairs.statuses import DUPLICATE_PAIR as DUPLICATE
from safetypairs.statuses import NOT_SELECTED
from safetypairs.engine.folders import OutputDirError


@pytest.fixture(scope="module")
def validated() -> Dataset:
    return validated_rows(n_sources=12)


@pytest.fixture(scope="module")
def release(validated):
    return assemble(validated, ReleaseConfig(split_by="source"))


@pytest.fixture(scope="module")
def written(release, tmp_path_factory) -> Path:
    return write_release(release, tmp_path_factory.mktemp("rel") / "dataset", ReleaseConfig(split_by="source"))


@pytest.mark.parametrize("kwargs", [{"split_by": "random"}, {"test_size": 1.0}, {"max_shard_size": 0},
                                    {"license": ""}, {"n_examples": -1}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ReleaseConfig(**kwargs)


def test_keeps_best_accepted_candidate_per_source(validated, release):
    # hand-built candidates with known preservation: lowest LPIPS outside wins, then highest SSIM, then PSNR,
    # then the earlier row; rejected candidates never win, and a source without an accepted one gives none
    rows = [  # source, accepted, lpips_outside, ssim_outside, psnr_outside
        ("a", True, 0.20, 0.90, 30.0), ("a", True, 0.10, 0.80, 25.0), ("a", False, 0.01, 0.99, 50.0),  # a: 1
        ("b", True, 0.10, 0.90, 30.0), ("b", True, 0.10, 0.95, 20.0), ("b", True, 0.10, 0.95, 40.0),  # b: 5
        ("c", False, 0.05, 0.99, 40.0), ("c", False, 0.01, 0.99, 40.0),  # c: none accepted
        ("d", True, None, 0.99, 45.0), ("d", True, 0.30, 0.70, 20.0),  # d: a measured LPIPS beats none: 9
        ("e", True, 0.10, 0.90, 30.0), ("e", True, 0.10, 0.90, 30.0),  # e: a tie goes to the earlier row: 10
    ]
    hand = Dataset.from_dict({name: list(col) for name, col in zip(
        (S.SOURCE_ID, S.ACCEPTED, S.LPIPS_OUTSIDE, S.SSIM_OUTSIDE, S.PSNR_OUTSIDE), zip(*rows))})
    assert best_candidates(hand) == [1, 5, 9, 10]
    pairs = [row for split in release["pairs"].values() for row in split]
    sources_with_accepted = {s for s, ok in zip(validated[S.SOURCE_ID], validated[S.ACCEPTED]) if ok}
    assert sorted(p[S.SOURCE_ID] for p in pairs) == sorted(sources_with_accepted)
    for p in pairs:
        rows = [r for r in validated if r[S.SOURCE_ID] == p[S.SOURCE_ID] and r[S.ACCEPTED]]
        chosen = min(rows, key=lambda r: r[S.LPIPS_OUTSIDE])  # lowest LPIPS outside wins
        assert digest(p[S.SAFE_IMAGE]) == digest(chosen[S.EDITED_IMAGE])
        assert digest(p[S.UNSAFE_IMAGE]) == digest(chosen[S.IMAGE])
        assert (p[S.SEED], p[S.EDITOR], p[S.POLICY], p[S.INSTRUCTOR]) == (
            chosen[S.SEED], chosen[S.EDITOR], chosen[S.POLICY], chosen[S.INSTRUCTOR])
    rejected = release["rejected"]["test"]
    assert len(rejected) + len(pairs) == len(validated)
    reasons = set(rejected[S.REJECT_REASON])
    assert reasons == {"not_local", NOT_SELECTED}
    assert release.funnel[-1]["rows_out"] == len(pairs)


def test_pair_ids_are_stable_and_unique(release):
    again = assemble(validated_rows(n_sources=12), ReleaseConfig(split_by="source"))
    ids = [i for split in release["pairs"].values() for i in split[S.PAIR_ID]]
    assert ids == [i for split in again["pairs"].values() for i in split[S.PAIR_ID]]
    assert len(set(ids)) == len(ids) and all(i.startswith("sp-") for i in ids)


def test_split_grouped_by_source_and_stratified(release):
    pairs = release["pairs"]
    assert set(pairs) == {"train", "test"}
    assert not set(pairs["train"][S.SOURCE_ID]) & set(pairs["test"][S.SOURCE_ID])
    assert set(pairs["train"][S.CATEGORY]) == set(pairs["test"][S.CATEGORY])
    for split, ds in release["images"].items():
        assert set(ds[S.PAIR_ID]) == set(pairs[split][S.PAIR_ID])


def test_split_keeps_every_row_of_a_source_together():
    sources = ["a", "a", "b", "c", "c", "d", "e", "f"]
    splits = split_by_source(sources, ["O1"] * 4 + ["O2"] * 4, ReleaseConfig(split_by="source", seed=3))
    side = {}
    for name, rows in splits.items():
        for i in rows:
            assert side.setdefault(sources[i], name) == name
    assert sorted(i for rows in splits.values() for i in rows) == list(range(len(sources)))
    assert split_by_source(sources, ["O1"] * 8, ReleaseConfig()) == {"test": list(range(8))}


def test_images_config_roles_labels_and_pixels(release):
    names = S.IMAGE_FEATURES[S.LABEL].names
    pairs = {p[S.PAIR_ID]: p for split in release["pairs"].values() for p in split}
    seen = defaultdict(dict)
    for split in release["images"].values():
        assert split.features == S.IMAGE_FEATURES
        for row in split:
            role = S.ROLES[row[S.ROLE]]  # role is a ClassLabel
            assert row[S.IMAGE_ID] == f"{row[S.PAIR_ID]}-{role}"
            assert row[S.SOURCE_ID] == pairs[row[S.PAIR_ID]][S.SOURCE_ID]  # identity travels to every image row
            rgb = row[S.IMAGE].convert("RGB")  # the digest: SHA-256 of mode, size and pixels, 16 hex characters
            assert row[S.IMAGE_DIGEST] == hashlib.sha256(f"RGB{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]
            seen[row[S.PAIR_ID]][role] = (names[row[S.LABEL]], digest(row[S.IMAGE]))
    for pid, roles in seen.items():
        p = pairs[pid]
        assert roles["original"] == ("unsafe", digest(p[S.UNSAFE_IMAGE]))
        assert roles["edited"] == ("safe", digest(p[S.SAFE_IMAGE]))
        if p[S.CONTROL_IMAGE] is None:
            assert "control" not in roles
        else:
            assert roles["control"] == ("unsafe", digest(p[S.CONTROL_IMAGE]))
    assert any("control" in r for r in seen.values()) and any("control" not in r for r in seen.values())


ROUND_TRIP = r"""
import hashlib, json, sys
import numpy as np
from datasets import load_dataset
out = {}
for config in ("pairs", "images"):
    dd = load_dataset(sys.argv[1]) if config == "pairs" else load_dataset(sys.argv[1], config)
    for split, ds in dd.items():
        rows = []
        for row in ds:
            rows.append({k: hashlib.sha256(np.asarray(v.convert("RGB")).tobytes()).hexdigest()
                         if hasattr(v, "convert") else v for k, v in row.items()})
        out[f"{config}/{split}"] = {"features": ds.features.to_dict(), "rows": rows}
assert "safetypairs" not in sys.modules
print(json.dumps(out))
"""


def _expected(dd) -> dict:
    out = {}
    for split, ds in dd.items():
        rows = [{k: digest(v) if hasattr(v, "convert") else v for k, v in row.items()} for row in ds]
        out[split] = {"features": ds.features.to_dict(), "rows": json.loads(json.dumps(rows))}
    return out


def test_round_trip_through_plain_load_dataset_in_subprocess(release, written, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(written)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for config in ("pairs", "images"):
        for split, expected in _expected(release[config]).items():
            assert loaded[f"{config}/{split}"] == expected, (config, split)
    assert loaded["images/test"]["features"]["label"]["names"] == ["safe", "unsafe"]


def test_layout_embeds_bytes_and_shards(release, written, tmp_path):
    files = sorted(p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file())
    assert "README.md" in files and "assets/example_grid.jpg" in files
    assert {f.split("/")[1] for f in files if f.startswith("data/")} == {"pairs", "images", "rejected"}
    table = pq.read_table(data_files(written, "pairs", "test")[0])
    cells = table.column(S.UNSAFE_IMAGE).to_pylist()
    assert all(c["bytes"] and not c["path"] for c in cells)
    small = write_release(release, tmp_path / "small", ReleaseConfig(split_by="source", max_shard_size="40KB"))
    shards = data_files(small, "images", "test")
    assert len(shards) > 1 and shards[0].name.endswith(f"-of-{len(shards):05d}.parquet")
    assert sum(pq.read_metadata(s).num_rows for s in shards) == len(release["images"]["test"])


def test_write_refuses_non_empty_folder(release, written):
    with pytest.raises(OutputDirError, match="not empty"):
        write_release(release, written)


def test_a_failure_mid_release_leaves_the_previous_folder_or_none(release, written, tmp_path, monkeypatch):
    import safetypairs.release.publish as publish
    from safetypairs.engine.folders import partial_dir

    def broken(*args, **kwargs):
        raise RuntimeError("disk full while writing the card")

    monkeypatch.setattr(publish, "render_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_release(release, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not partial_dir(tmp_path / "new").exists()
    before = sorted(p.relative_to(written) for p in written.rglob("*"))
    with pytest.raises(RuntimeError, match="disk full"):
        write_release(release, written, overwrite=True)
    assert sorted(p.relative_to(written) for p in written.rglob("*")) == before  # the old release is intact


def test_missing_required_column_is_named(validated):
    with pytest.raises(ValueError, match="accepted"):
        assemble(validated.remove_columns(S.ACCEPTED))


def test_read_input_and_cli_dry_run(validated, tmp_path, capsys):
    validated.save_to_disk(str(tmp_path / "validated"))
    assert isinstance(read_input(tmp_path / "validated"), Dataset)
    out = tmp_path / "release"
    rc = main(["-q", "release", str(tmp_path / "validated"), "--out", str(out), "--split-by", "source",
               "--test-size", "0.5", "--push", "org/safetypairs", "--gated", "--dry-run"])
    printed = capsys.readouterr().out
    assert rc == 0 and "dry run" in printed and "data/pairs/test-00000-of-00001.parquet" in printed
    assert (out / "README.md").is_file()
    assert main(["release", str(tmp_path / "validated"), "--out", str(out)]) == 2  # not empty
    assert main(["release", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err


def test_nothing_accepted_is_a_clear_error_and_empty_configs_are_left_out():
    rows = validated_rows(n_sources=3, candidates=1)
    with pytest.raises(ValueError, match="no accepted candidate"):
        assemble(rows.map(lambda r: {S.ACCEPTED: False}))
    everything = assemble(rows.map(lambda r: {S.ACCEPTED: True}))
    assert list(everything.configs) == ["pairs", "images"]  # no rejected rows: no empty config to break loading


def test_duplicate_sources_give_one_pair_not_one_per_split():
    rows = validated_rows(n_sources=4).to_list()
    copies = [dict(r, **{S.SOURCE_ID: "src-copy"}) for r in rows if r[S.SOURCE_ID] == "src-001"]
    validated = Dataset.from_list(rows + copies, features=validated_rows(n_sources=1).features)
    release = assemble(validated, ReleaseConfig(split_by="source"))
    ids = [i for split in release["pairs"].values() for i in split[S.PAIR_ID]]
    assert len(ids) == len(set(ids)) == 4
    rejected = release["rejected"]["test"]
    assert rejected[S.REJECT_REASON].count(DUPLICATE) == 1
    assert len(rejected) + len(ids) == len(validated)  # no row lost
    assert release.funnel[-1]["rows_out"] == 4


def test_a_card_the_project_wrote_it_reads_back_whatever_the_name(tmp_path, validated):
    """A title holding '---' is not a front-matter delimiter; a name or license with a newline is refused."""
    from safetypairs.engine.datafiles import load_release

    out = write_release(validated, tmp_path / "rel", ReleaseConfig(pretty_name="SafetyPairs---v2"))
    assert "SafetyPairs---v2" in (out / "README.md").read_text()
    assert len(load_release(str(out), "images", "auto")) > 0
    for bad in ({"pretty_name": "two\nlines"}, {"license": "mit\n---\nconfigs: []"}, {"pretty_name": " padded"}):
        with pytest.raises(ValueError, match="must be one line"):
            ReleaseConfig(**bad)


@pytest.mark.parametrize("pattern", ["/etc/*.parquet", "../elsewhere/*.parquet"])
def test_a_card_whose_data_files_leave_the_folder_is_one_clear_error(tmp_path, validated, pattern):
    from safetypairs.engine.datafiles import load_release

    out = write_release(validated, tmp_path / "rel", ReleaseConfig())
    card = (out / "README.md").read_text()
    (out / "README.md").write_text(card.replace("path: data/images/", f"path: {pattern} #", 1))
    with pytest.raises(ValueError, match="must be a path relative to the release folder"):
        load_release(str(out), "images", "auto")


def _gif(frames: list) -> bytes:
    """An animated GIF of ``frames`` (RGB images), no transparency."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _odd_originals() -> dict[str, tuple[bytes, Image.Image]]:
    """Original file bytes in source formats and modes an edit never has, with the first frame each should be
    released as: PIL's own RGB conversion of the file (the 16-bit PNG holds the 8-bit gray photo x 257, whose RGB
    form is that gray photo)."""
    base = photo("astronaut", 64)
    gray16 = encode(Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)))
    palette = encode(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    gif = _gif([photo(name, 64) for name in ("chelsea", "coffee", "rocket")])
    cmyk = cmyk_icc(photo("camera", 64))
    return {
        "cmyk.jpg": (cmyk, Image.open(io.BytesIO(cmyk)).convert("RGB")),
        "gray16.png": (gray16, base.convert("L").convert("RGB")),
        "palette.png": (palette, Image.open(io.BytesIO(palette)).convert("RGB")),
        "animated.gif": (gif, Image.open(io.BytesIO(gif)).convert("RGB")),  # Image.open shows frame 0
    }


def test_both_images_of_a_pair_are_released_alike_whatever_the_source_format(tmp_path, monkeypatch):
    """Issue 23 #16: a CMYK JPEG, a 16-bit PNG, a palette PNG and an animated GIF as originals are released as RGB
    PNGs of their first frame, like their edits (and controls); the card says so; the writer decodes none of the
    re-encoded originals again."""
    originals = _odd_originals()
    rows = validated_rows(n_sources=len(originals), candidates=1).to_list()
    for row, (name, (data, first)) in zip(rows, originals.items()):
        edited = first.copy()
        ImageDraw.Draw(edited).rectangle((2, 2, 30, 14), fill=(20, 200, 40))
        row.update({S.SOURCE_ID: name, S.IMAGE: {"bytes": data, "path": None}, S.EDITED_IMAGE: edited,
                    S.CONTROL_IMAGE: first, S.ACCEPTED: True, S.REJECT_REASON: None})
    validated = Dataset.from_list(rows, features=validated_rows(1, 1).features)
    decoded: list[str] = []
    original_check = imagechecks.check_cell
    monkeypatch.setattr(imagechecks, "check_cell", lambda cell, *a, **k: decoded.append(
        hashlib.sha256(cell["bytes"]).hexdigest()[:32]) or original_check(cell, *a, **k))
    out = write_release(validated, tmp_path / "rel")
    pairs = pq.read_table(data_files(out, "pairs", "test")).to_pylist()
    assert sorted(row[S.SOURCE_ID] for row in pairs) == sorted(originals)
    for row in pairs:
        images = {column: Image.open(io.BytesIO(row[column]["bytes"]))
                  for column in (S.UNSAFE_IMAGE, S.SAFE_IMAGE, S.CONTROL_IMAGE)}
        assert {(im.format, im.mode, getattr(im, "n_frames", 1)) for im in images.values()} == {("PNG", "RGB", 1)}
        expected = originals[row[S.SOURCE_ID]][1]
        assert np.array_equal(np.asarray(images[S.UNSAFE_IMAGE]), np.asarray(expected)), row[S.SOURCE_ID]
        assert hashlib.sha256(row[S.UNSAFE_IMAGE]["bytes"]).hexdigest()[:32] not in decoded
    released = pq.read_table(data_files(out, "images", "test")).to_pylist()
    assert len(released) == 3 * len(originals)
    assert {(Image.open(io.BytesIO(r["image"]["bytes"])).format, Image.open(io.BytesIO(r["image"]["bytes"])).mode)
            for r in released} == {("PNG", "RGB")}
    card = " ".join((out / "README.md").read_text().split())
    assert "Every image of a pair is stored alike, as an 8-bit RGB PNG" in card
    assert "neither the file format nor the mode tells an original from an edit" in card
