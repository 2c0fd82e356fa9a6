"""Hostile input: unreadable, huge and lying images and broken folders never break a run or lose data.

The files are made in code (tests/hostile_files.py). generate and validate run as subprocesses whose peak
RSS is measured; release and evaluate run through `cli.main` in this process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import (
    Dataset,
    Features,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets import Image as ImageFeature
from hostile_files import LIE_SIDE, encode, exif_rotated, hostile_files, photo, write_files
from PIL import Image, ImageDraw

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.cli import main
from safetypairs.engine.datafiles import load_run, write_parquet
from safetypairs.engine.folders import partial_dir
from safetypairs.images import ImageError, ImageTooLargeError, load_image
from safetypairs.sources import render_demo_row

SRC = str(Path(__file__).resolve().parents[1] / "src")
MAX_RSS_MB = 1500
UNREADABLE = {  # file -> what its error says
    "truncated.png": "truncated", "truncated.jpg": "truncated", "zero.png": "empty file (0 bytes)",
    "pdf_renamed.png": "%PDF", "garbage.jpg": "not an image", "lying_small.png": "truncated",
}
TOO_LARGE = {"huge.png": "12000x12000", "lying_header.png": f"{LIE_SIDE}x{LIE_SIDE}"}
READABLE = ("good.png", "cmyk_icc.jpg", "sixteen_bit.png", "palette_alpha.png", "transparent.png", "one_pixel.png",
            "exif_rotated.jpg")


def measured_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``safetypairs ARGS`` under a parent whose only child it is; returns it and the child's peak RSS in MB."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stderr.write(p.stderr); print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "safetypairs", "-q", *args],
                          capture_output=True, text=True, env=env)
    rc, maxrss_kb = proc.stdout.split()[-2:]
    proc.returncode = int(rc)
    return proc, int(maxrss_kb) / 1024


def iterate_everything(ds: Dataset) -> list[dict]:
    """Every access path with default decoding: iteration, indexing and pandas."""
    rows = list(ds)
    assert [ds[i] for i in range(len(ds))] == rows
    assert len(ds.to_pandas()) == len(ds)
    return rows


def _edited(image: Image.Image) -> bytes:
    edited = image.copy()
    ImageDraw.Draw(edited).rectangle((10, 10, 30, 24), fill=(250, 20, 20))
    return encode(edited)


def candidate_rows(features) -> Dataset:
    """Hand-made validate input: hostile originals and edits, a mismatched size, bad categories, a 1x1 pair."""
    good, files = photo(96), hostile_files()
    good_bytes, edit_bytes = encode(good), _edited(good)
    rows = {"cand-good": (good_bytes, edit_bytes, "O1"), "cand-edit-truncated": (good_bytes, files["truncated.png"], "O1"),
            "cand-mismatch": (good_bytes, encode(good.resize((80, 80))), "O1"),
            "cand-one-pixel": (files["one_pixel.png"], files["one_pixel.png"], "O1"),
            "cand-cat-null": (good_bytes, edit_bytes, None), "cand-cat-blank": (good_bytes, edit_bytes, " "),
            "cand-cat-unknown": (good_bytes, edit_bytes, "O99")}
    rows.update({f"cand-orig-{name}": (files[name], edit_bytes, "O1") for name in (*UNREADABLE, *TOO_LARGE)})
    out = []
    for sid, (original, edited, category) in rows.items():
        row = {name: None for name in features}
        row.update({S.SOURCE_ID: sid, S.CATEGORY: category, S.IMAGE: {"bytes": original, "path": None},
                    S.EDITED_IMAGE: {"bytes": edited, "path": None}, S.INSTRUCTION: "paint a red box",
                    S.EDIT_STATUS: ST.OK, S.INSTRUCT_STATUS: ST.OK, S.CANDIDATE: 0})
        out.append(row)
    return Dataset.from_list(out, features=features)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """generate on the hostile image folder, then validate its rows plus `candidate_rows`, both measured."""
    root = tmp_path_factory.mktemp("hostile")
    paths = write_files(root / "source", render_demo_row(0, 0)[S.IMAGE])
    with open(root / "source" / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for name in paths:
            meta.write(json.dumps({"file_name": name, "source_id": name, "category": "O1"}) + "\n")
    gen, gen_rss = measured_cli("generate", "--source", str(root / "source"), "--out", str(root / "gen"),
                                "--device", "cpu")
    assert gen.returncode == 0, gen.stderr
    generated = load_run(root / "gen")
    validate_input = concatenate_datasets([generated, candidate_rows(generated.features)])
    validate_input.save_to_disk(str(root / "candidates"))
    val, val_rss = measured_cli("validate", str(root / "candidates"), "--out", str(root / "val"), "--device", "cpu")
    assert val.returncode == 0, val.stderr
    print(f"peak RSS: generate {gen_rss:.0f} MB, validate {val_rss:.0f} MB (bound {MAX_RSS_MB} MB)")
    return {"root": root, "files": list(paths), "rss": {"generate": gen_rss, "validate": val_rss},
            "n_validate": len(validate_input)}


def test_peak_memory_with_a_12000x12000_png_stays_bounded(runs):
    assert runs["rss"]["generate"] < MAX_RSS_MB and runs["rss"]["validate"] < MAX_RSS_MB, runs["rss"]


def test_generate_keeps_every_row_and_nulls_unreadable_cells(runs):
    out = load_run(runs["root"] / "gen")
    rows = {row[S.SOURCE_ID]: row for row in iterate_everything(out)}
    assert list(rows) == runs["files"]  # rows in = rows out, in order
    for name, cause in {**UNREADABLE, **TOO_LARGE}.items():
        row = rows[name]
        assert row[S.IMAGE] is None, name  # the bytes are not carried on
        assert row[S.INSTRUCT_STATUS] == ("too_large" if name in TOO_LARGE else "unreadable")
        assert name in row[S.INSTRUCT_ERROR] and cause in row[S.INSTRUCT_ERROR], row[S.INSTRUCT_ERROR]
        assert "BytesIO" not in row[S.INSTRUCT_ERROR] and "DecompressionBomb" not in row[S.INSTRUCT_ERROR]
        assert row[S.EDIT_STATUS] == "not_instructed"
    for name in READABLE:
        assert isinstance(rows[name][S.IMAGE], Image.Image), name
    for name in ("good.png", "cmyk_icc.jpg", "exif_rotated.jpg"):  # the captioned photo in odd encodings is edited
        assert rows[name][S.EDIT_STATUS] == ST.OK and rows[name][S.EDITED_IMAGE].size == (512, 512), name


def test_validate_names_rows_and_causes_and_checks_categories(runs):
    out = load_run(runs["root"] / "val")
    rows = {row[S.SOURCE_ID]: row for row in iterate_everything(out)}
    assert len(out) == runs["n_validate"]
    expected = {"cand-good": ST.OK, "cand-edit-truncated": "unreadable", "cand-mismatch": "size_mismatch",
                "cand-one-pixel": "too_small", "cand-cat-null": "unknown_category",
                "cand-cat-blank": "unknown_category", "cand-cat-unknown": "unknown_category",
                **{f"cand-orig-{n}": "unreadable" for n in UNREADABLE}, **{f"cand-orig-{n}": "too_large" for n in TOO_LARGE}}
    assert {sid: rows[sid][S.VALIDATE_STATUS] for sid in expected} == expected
    assert rows["cand-good"][S.ACCEPTED]
    for name, cause in {**UNREADABLE, **TOO_LARGE}.items():
        row = rows[f"cand-orig-{name}"]
        assert row[S.IMAGE] is None and row[S.EDITED_IMAGE] is not None and not row[S.ACCEPTED]
        assert f"cand-orig-{name}" in row[S.VALIDATE_ERROR] and cause in row[S.VALIDATE_ERROR], row[S.VALIDATE_ERROR]
        assert "BytesIO" not in row[S.VALIDATE_ERROR] and "not found" not in row[S.VALIDATE_ERROR]
    assert rows["cand-edit-truncated"][S.EDITED_IMAGE] is None and rows["cand-edit-truncated"][S.IMAGE] is not None
    assert "O99" in rows["cand-cat-unknown"][S.REJECT_REASON] or "O99" in rows["cand-cat-unknown"][S.VALIDATE_ERROR]
    assert "allowed: O1" in rows["cand-cat-null"][S.VALIDATE_ERROR]
    for name in ("good.png", "cmyk_icc.jpg", "exif_rotated.jpg"):
        assert rows[name][S.VALIDATE_STATUS] == ST.OK, rows[name][S.VALIDATE_ERROR]


def test_release_and_evaluate_of_the_hostile_run(runs, tmp_path, capsys):
    release = tmp_path / "release"
    assert main(["-q", "release", str(runs["root"] / "val"), "--out", str(release)]) == 0
    pairs, rejected = (load_dataset(str(release), name, split="test") for name in ("pairs", "rejected"))
    images = load_dataset(str(release), "images", split="test")
    assert len(pairs) + len(rejected) == runs["n_validate"]
    assert {"cand-good", "good.png"} <= set(pairs[S.SOURCE_ID])
    for ds in (pairs, rejected, images):
        iterate_everything(ds)
    by_id = {row[S.SOURCE_ID]: row for row in rejected}
    assert by_id["cand-orig-zero.png"][S.UNSAFE_IMAGE] is None and by_id["cand-orig-zero.png"][S.PAIR_ID] is None
    assert "cand-orig-zero.png" in by_id["cand-orig-zero.png"][S.VALIDATE_ERROR]
    assert by_id["huge.png"][S.UNSAFE_IMAGE] is None

    evaluation = tmp_path / "evaluation"
    assert main(["-q", "evaluate", "--dataset", str(release), "--guard", "ocr-lexicon", "--out", str(evaluation),
                 "--device", "cpu", "--bootstrap", "0"]) == 0
    assert len(Dataset.from_parquet(str(evaluation / "predictions.parquet"))) == len(images)


def test_release_never_fails_on_a_row_it_rejects(tmp_path):
    from release_rows import validated_rows

    from safetypairs.release.builder import export_raw, load_raw
    from safetypairs.release.assemble import assemble

    files = hostile_files()
    rows = validated_rows(4, 2, 48).cast_column(S.IMAGE, ImageFeature(decode=False)).to_list()
    rows = [dict(r) for r in rows]
    rows[1][S.IMAGE] = {"bytes": files["truncated.png"], "path": None}  # src-000 cand 1: accepted, unreadable
    rows[2][S.CATEGORY] = rows[3][S.CATEGORY] = None  # src-001: accepted with a null category
    rows[5][S.EDITED_IMAGE] = {"bytes": files["garbage.jpg"], "path": None}  # src-002 cand 1: rejected, garbage edit
    rows[6][S.IMAGE] = {"bytes": files["lying_header.png"], "path": None}  # src-003 cand 0: rejected, lying header
    features = validated_rows(1, 1, 8).features
    Dataset.from_list(rows, features=features.copy()).save_to_disk(str(tmp_path / "validated"))
    out = tmp_path / "release"
    assert main(["-q", "release", str(tmp_path / "validated"), "--out", str(out)]) == 0
    assert (out / "README.md").is_file() and (out / "assets" / "example_grid.jpg").is_file()
    pairs = iterate_everything(load_dataset(str(out), "pairs", split="test"))
    assert sorted(p[S.SOURCE_ID] for p in pairs) == ["src-001", "src-002", "src-003"]
    assert next(p for p in pairs if p[S.SOURCE_ID] == "src-001")[S.CATEGORY] is None
    rejected = {(r[S.SOURCE_ID], r[S.CANDIDATE]): r for r in iterate_everything(load_dataset(str(out), "rejected", split="test"))}
    unreadable = rejected[("src-000", 1)]
    assert unreadable[S.REJECT_REASON] == "unreadable" and unreadable[S.UNSAFE_IMAGE] is None
    assert "src-000" in unreadable[S.VALIDATE_ERROR] and "truncated" in unreadable[S.VALIDATE_ERROR]
    assert rejected[("src-002", 1)][S.SAFE_IMAGE] is None and rejected[("src-002", 1)][S.PAIR_ID] is None
    assert rejected[("src-003", 0)][S.UNSAFE_IMAGE] is None
    release = assemble(load_from_disk(str(tmp_path / "validated")))  # in memory, before any writer: null cells too
    for splits in release.configs.values():
        for ds in splits.values():
            iterate_everything(ds)
    export_raw(release, tmp_path / "raw")
    assert len(load_raw(tmp_path / "raw")["rejected"]["test"]) == len(rejected)


def test_evaluate_a_release_holding_unreadable_bytes(runs, tmp_path):
    """A release written by something else (no null cells): every image still gets a prediction row."""
    release = tmp_path / "release"
    assert main(["-q", "release", str(runs["root"] / "val"), "--out", str(release), "--no-rejected"]) == 0
    files = hostile_files()
    images = load_dataset(str(release), "images", split="test").cast_column(S.IMAGE, ImageFeature(decode=False))
    bad = ["truncated.png", "zero.png", "huge.png", "lying_header.png"]
    hostile = images.map(lambda row, i: {S.IMAGE: {"bytes": files[bad[i]], "path": None}} if i < len(bad) else {},
                         with_indices=True)
    forged = tmp_path / "forged"  # a new folder: the datasets cache knows the old one
    shutil.copytree(release, forged, ignore=shutil.ignore_patterns("images"))
    hostile.to_parquet(str(forged / "data" / "images" / "test-00000-of-00001.parquet"))  # bytes as they are
    out = tmp_path / "evaluation"
    assert main(["-q", "evaluate", "--dataset", str(forged), "--guard", "ocr-lexicon", "--out", str(out),
                 "--device", "cpu", "--bootstrap", "0"]) == 0
    predictions = Dataset.from_parquet(str(out / "predictions.parquet"))
    status = next(c for c in predictions.column_names if c.endswith("_status"))
    assert len(predictions) == len(images)
    assert predictions[status][: len(bad)] == ["unreadable", "unreadable", "too_large", "too_large"]


# ----------------------------------------------------------------------------- CLI failures


def _one_line_exit_2(capfd, argv: list[str]) -> str:
    capfd.readouterr()  # what the test's own set-up printed (datasets' bars when saving its inputs)
    assert main(argv) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"safetypairs {argv[1]}: error: "), err
    return err


def _nothing_left(out: Path) -> None:
    assert not out.exists() and not partial_dir(out).exists(), sorted(out.parent.iterdir())


def test_input_failures_are_one_line_exit_2_and_leave_nothing(runs, tmp_path, capfd):
    broken = tmp_path / "broken"
    (tmp_path / "empty").mkdir()
    Dataset.from_dict({S.SOURCE_ID: [], S.IMAGE: []}).save_to_disk(str(tmp_path / "no_rows"))
    shutil.copytree(runs["root"] / "gen", broken)
    data = sorted((broken / "data").glob("*.parquet"))[0]
    data.write_bytes(data.read_bytes()[:300])  # truncated
    shutil.copytree(runs["root"] / "gen", tmp_path / "missing")
    for path in (tmp_path / "missing" / "data").glob("*.parquet"):
        path.unlink()
    (tmp_path / "bad_saved").mkdir()
    (tmp_path / "bad_saved" / "state.json").write_text("{}")
    out = tmp_path / "out"
    cases = {
        "validate-missing": ["validate", str(tmp_path / "nope")],
        "validate-empty-folder": ["validate", str(tmp_path / "empty")],
        "validate-truncated-parquet": ["validate", str(broken)],
        "release-truncated-parquet": ["release", str(broken)],
        "validate-no-rows": ["validate", str(tmp_path / "no_rows")],
        "release-no-rows": ["release", str(tmp_path / "no_rows")],
        "release-bad-save_to_disk": ["release", str(tmp_path / "bad_saved")],
        "generate-empty-folder": ["generate", "--source", str(tmp_path / "empty")],
        "generate-no-rows": ["generate", "--source", str(tmp_path / "no_rows")],
        "evaluate-empty-folder": ["evaluate", "--guard", "ocr-lexicon", "--dataset", str(tmp_path / "empty")],
    }
    for name, argv in cases.items():
        err = _one_line_exit_2(capfd, ["-q", *argv, "--out", str(out)])
        _nothing_left(out)
        if "truncated" in name:
            assert data.name in err, err
    err = _one_line_exit_2(capfd, ["-q", "validate", str(tmp_path / "missing"), "--out", str(out)])
    assert "missing" in err and "train-00000" in err, err  # a data file run.json lists is gone
    _nothing_left(out)


def test_push_without_a_network_is_one_line_and_leaves_no_folder(runs, tmp_path, capfd, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "release"
    err = _one_line_exit_2(capfd, ["-q", "release", str(runs["root"] / "val"), "--out", str(out), "--push", "org/name"])
    assert "org/name" in err  # offline mode (the test set-up)
    _nothing_left(out)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    err = _one_line_exit_2(capfd, ["-q", "release", str(runs["root"] / "val"), "--out", str(out), "--push", "org/name"])
    assert "cannot reach the Hub" in err, err
    _nothing_left(out)


def test_outputs_that_would_overwrite_input_or_foreign_files_are_refused(runs, tmp_path, capfd):
    source, val = runs["root"] / "source", runs["root"] / "val"
    before = sorted(p.name for p in val.iterdir())
    for argv in (["release", str(val), "--out", str(val), "--overwrite"], ["release", str(val), "--out", str(val / "x")],
                 ["validate", str(val), "--out", str(val.parent)],
                 ["generate", "--source", str(source), "--out", str(source / "out")],
                 ["evaluate", "--guard", "ocr-lexicon", "--dataset", str(val), "--out", str(val / "eval")]):
        assert "is the input" in _one_line_exit_2(capfd, ["-q", *argv])
    assert sorted(p.name for p in val.iterdir()) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for argv in (["generate", "--source", "demo:1"], ["validate", str(val)]):
        assert "--overwrite" in _one_line_exit_2(capfd, ["-q", *argv, "--out", str(foreign)])
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------- the pixel cap, in this process


def test_load_image_caps_pixels_without_pils_bomb_check():
    files = hostile_files()
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match=f"{LIE_SIDE}x{LIE_SIDE}.*max_pixels=40,000,000"):
        load_image(files["lying_header.png"])
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's own limits are left as they are
    jpeg, png = encode(photo(96).resize((640, 480)), "JPEG"), encode(photo(96).resize((640, 480)))
    assert load_image(jpeg, max_pixels=100_000).size == (320, 240)  # decoded at 1/2 size (draft)
    assert load_image(jpeg, max_pixels=10_000).size == (80, 60)  # 1/8
    with pytest.raises(ImageTooLargeError, match="even at 1/8"):
        load_image(jpeg, max_pixels=1_000)
    with pytest.raises(ImageTooLargeError):
        load_image(png, max_pixels=100_000)  # a PNG cannot be decoded reduced
    assert load_image(photo(96).resize((640, 480)), max_pixels=100_000).size == (320, 240)  # in memory: reduce
    wide = photo(96).resize((96, 64))  # not square, so a missed EXIF transpose shows in the size and the pixels
    upright = load_image(exif_rotated(wide))
    assert upright.size == (96, 64)
    assert np.abs(np.asarray(upright, dtype=float) - np.asarray(wide, dtype=float)).mean() < 4  # JPEG noise only
    assert load_image({"bytes": files["cmyk_icc.jpg"], "path": "x.jpg"}).mode == "RGB"
    with pytest.raises(ImageError, match=r"image 'x\.png': empty file \(0 bytes\)"):
        load_image({"bytes": b"", "path": "x.png"})
    with pytest.raises(ValueError, match="max_pixels"):
        from safetypairs.validate.stage import ValidateConfig

        ValidateConfig(max_pixels=0)


def test_write_parquet_nulls_unreadable_cells_and_reduces_oversized_ones(tmp_path):
    files = hostile_files()
    big_jpeg = encode(photo(96).resize((640, 480)), "JPEG")
    cells = [files["good.png"], files["truncated.png"], files["zero.png"], big_jpeg, files["huge.png"]]
    ds = Dataset.from_dict({S.SOURCE_ID: list("abcde"), S.IMAGE: [{"bytes": c, "path": None} for c in cells]},
                           features=Features({S.SOURCE_ID: Value("string"), S.IMAGE: ImageFeature()}))
    counts = write_parquet(ds, tmp_path / "rows.parquet", max_pixels=100_000)
    assert counts == {"image: unreadable": 2, "image: reduced": 1, "image: too_large": 1}
    rows = iterate_everything(Dataset.from_parquet(str(tmp_path / "rows.parquet")))
    assert [r[S.IMAGE] is None for r in rows] == [False, True, True, False, True]
    assert rows[3][S.IMAGE].size == (320, 240)


def test_written_cells_stay_within_pillows_own_limit(tmp_path, monkeypatch):
    """A cap above Pillow's bomb limit still writes cells that default decoding reads (reduced to that limit)."""
    png = encode(photo(96).resize((640, 480)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    ds = Dataset.from_dict({S.IMAGE: [{"bytes": png, "path": None}]}, features=Features({S.IMAGE: ImageFeature()}))
    assert write_parquet(ds, tmp_path / "rows.parquet", max_pixels=10_000_000) == {"image: reduced": 1}
    (row,) = iterate_everything(Dataset.from_parquet(str(tmp_path / "rows.parquet")))
    assert row[S.IMAGE].width * row[S.IMAGE].height <= 50_000


def test_a_pixel_cap_no_image_can_pass_is_refused_and_a_run_that_measured_nothing_fails(tmp_path):
    """`--max-pixels 1` nulled every image and exited 0; now the cap is refused up front, and a validate run in
    which no row could be measured exits 2 naming the statuses and the first error."""
    from safetypairs.cli import main
    from safetypairs.validate.stage import ValidateConfig

    with pytest.raises(ValueError, match="max_pixels must be an integer of at least 1024"):
        ValidateConfig(max_pixels=1)
    generate = ["generate", "--source", "demo:2", "--device", "cpu", "--out", str(tmp_path / "g")]
    assert main(generate) == 0
    assert main(["validate", str(tmp_path / "g"), "--max-pixels", "1", "--out", str(tmp_path / "v0")]) == 2
    assert main(["validate", str(tmp_path / "g"), "--max-pixels", "1024", "--out", str(tmp_path / "v")]) == 2
    assert (tmp_path / "v" / "run.json").is_file()  # kept for inspection


def test_an_exception_without_a_message_says_where_it_was_raised():
    from safetypairs.engine.stage import isolate

    class ResizeImgError(Exception):
        pass

    def fails(items):
        raise ResizeImgError()

    [(result, error)] = isolate(fails, ["x"])
    assert result is None and error.startswith("ResizeImgError: raised with no message in test_hostile.py:")
    assert error.endswith("(fails)")
