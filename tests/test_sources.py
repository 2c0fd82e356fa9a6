"""The built-in demo source and loading user sources."""

import json

import pytest
from datasets import Dataset

from safetypairs import schema as S
from safetypairs.instructions import demo_text
from safetypairs.policy import load_policy
from safetypairs.sources import (
    DEMO_PHOTOS,
    SourceColumns,
    build_demo_source,
    demo_photo,
    load_source,
)


def test_demo_text_is_consistent_with_the_policy_lexicon():
    policy = load_policy()
    text = demo_text()
    assert all(policy.lexicon_matches(c, "O1") for c in text["harassing"])
    assert not any(policy.lexicon_matches(b) for b in text["benign"])


def test_demo_photos_are_real_and_offline():
    for name in DEMO_PHOTOS:
        image = demo_photo(name)
        assert image.mode == "RGB" and max(image.size) <= 512 and min(image.size) >= 100


def test_build_demo_source_is_deterministic_and_varied():
    a, b = build_demo_source(6, seed=3), build_demo_source(6, seed=3)
    assert a.features == S.SOURCE_FEATURES and len(a) == 6
    assert a[S.SOURCE_META] == b[S.SOURCE_META]
    metas = [json.loads(m) for m in a[S.SOURCE_META]]
    assert len({m["font"] for m in metas}) > 1 and len({m["photo"] for m in metas}) == 6
    for row, meta in zip(a, metas):
        assert row[S.CATEGORY] == "O1" and meta["text"] in row[S.RATIONALE]
        x0, y0, x1, y1 = meta["box"]
        assert 0 <= x0 < x1 <= row[S.IMAGE].width and 0 <= y0 < y1 <= row[S.IMAGE].height
    assert build_demo_source(6, seed=4)[S.SOURCE_META] != a[S.SOURCE_META]
    with pytest.raises(ValueError, match="at least one"):
        build_demo_source(0)


def test_load_source_from_saved_dataset_adds_missing_columns(tmp_path):
    ds = Dataset.from_dict({S.IMAGE: [demo_photo("coins")]}).cast_column(S.IMAGE, S.SOURCE_FEATURES[S.IMAGE])
    ds.save_to_disk(tmp_path / "saved")
    loaded = load_source(str(tmp_path / "saved"))
    assert loaded[0][S.SOURCE_ID] == "000000" and loaded[0][S.CATEGORY] == ""
    with pytest.raises(ValueError, match="no column 'image' \\(--image-column\\)"):
        Dataset.from_dict({"x": [1]}).save_to_disk(tmp_path / "bad")
        load_source(str(tmp_path / "bad"))



def test_load_source_from_saved_dataset_dict_picks_the_split(tmp_path):
    from datasets import DatasetDict

    image = S.SOURCE_FEATURES[S.IMAGE]
    train = Dataset.from_dict({S.IMAGE: [demo_photo("coins")], S.SOURCE_ID: ["t"]}).cast_column(S.IMAGE, image)
    test = Dataset.from_dict({S.IMAGE: [demo_photo("moon")] * 2, S.SOURCE_ID: ["a", "b"]}).cast_column(S.IMAGE, image)
    DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "dd")
    assert load_source(str(tmp_path / "dd"), split="test")[S.SOURCE_ID] == ["a", "b"]
    with pytest.raises(ValueError, match="split 'dev' not in .*available: train, test"):
        load_source(str(tmp_path / "dd"), split="dev")

def test_load_source_image_folder(tmp_path):
    demo_photo("chelsea").save(tmp_path / "cat.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "cat.png", "category": "O8"}) + "\n")
    loaded = load_source(str(tmp_path))
    assert loaded[0][S.CATEGORY] == "O8" and loaded[0][S.IMAGE].size == demo_photo("chelsea").size


def _write_photos(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        demo_photo(name).resize((64, 48)).save(folder / f"{name}.png")


def test_image_folder_with_metadata_csv_ids_are_relative_paths(tmp_path):
    _write_photos(tmp_path / "data" / "pics", ["coins", "moon", "clock"])
    (tmp_path / "data" / "metadata.csv").write_text(
        "file_name,rating,category,rationale,annotator\n"
        "pics/coins.png,Unsafe,O1: Hate Humiliation Harassment,insult,ann1\n"
        "pics/moon.png,Safe,NA: None applying,,ann2\n"
        "pics/clock.png,unsafe,Harassment,a slur,ann1\n")
    (tmp_path / "data" / "README.md").write_text("# my data\n")  # a card beside the metadata changes nothing
    rows = load_source(str(tmp_path / "data"), columns=SourceColumns(keep=("annotator",)))
    assert rows[S.SOURCE_ID] == ["pics/coins.png", "pics/moon.png", "pics/clock.png"]
    assert rows[S.SOURCE_LABEL] == ["unsafe", "safe", "unsafe"]
    assert [json.loads(m) for m in rows[S.SOURCE_META]] == [
        {"rating": "Unsafe", "annotator": "ann1"}, {"rating": "Safe", "annotator": "ann2"},
        {"rating": "unsafe", "annotator": "ann1"}]
    assert rows[S.RATIONALE] == ["insult", "", "a slur"] and rows[0][S.IMAGE].size == (64, 48)


def test_other_schemas_map_through_source_columns(tmp_path):
    """UnsafeBench-style data: another image column, a safety_label, category names; ids from a column."""
    from datasets import ClassLabel, Features, Image, Value

    features = Features({"img": Image(), "uid": Value("string"), "safety_label": ClassLabel(names=["Safe", "Unsafe"]),
                         "category": Value("string"), "why": Value("string")})
    ds = Dataset.from_dict({"img": [demo_photo(n) for n in ("coins", "moon")], "uid": ["u1", "u2"],
                            "safety_label": [1, 0], "category": ["Hate", "Violence"], "why": ["w1", "w2"]},
                           features=features)
    ds.to_parquet(str(tmp_path / "bench.parquet"))
    columns = SourceColumns(image="img", id="uid", rationale="why")
    rows = load_source(str(tmp_path / "bench.parquet"), columns=columns)
    assert rows[S.SOURCE_ID] == ["u1", "u2"] and rows[S.SOURCE_LABEL] == ["unsafe", "safe"]
    assert rows[S.RATIONALE] == ["w1", "w2"] and S.IMAGE in rows.column_names and "img" not in rows.column_names
    assert json.loads(rows[S.SOURCE_META][0]) == {"safety_label": "Unsafe"}
    unlabelled = load_source(str(tmp_path / "bench.parquet"), columns=SourceColumns(image="img", label="none"))
    assert unlabelled[S.SOURCE_LABEL] == ["", ""]


def test_source_errors_name_the_column_or_the_fix(tmp_path, monkeypatch):
    ds = Dataset.from_dict({S.IMAGE: [demo_photo("coins")] * 2, "uid": ["a", "a"], "label": ["unsafe", "maybe"]})
    ds.cast_column(S.IMAGE, S.SOURCE_FEATURES[S.IMAGE]).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"repeated or empty: \['a'\]; pass --id-column"):
        load_source(str(tmp_path / "saved"), columns=SourceColumns(id="uid", label="none"))
    with pytest.raises(ValueError, match="row 1: 'maybe' is not a safety label"):
        load_source(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"no column 'kind' \(--category-column\)|no column 'x' \(--keep-columns\)"):
        load_source(str(tmp_path / "saved"), columns=SourceColumns(keep=("x",), label="none"))
    import safetypairs.sources

    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub lookup for {args}")

    monkeypatch.setattr(safetypairs.sources, "load_dataset", no_hub)  # a local-looking spec never reaches the hub
    for spec in ("nonexist", str(tmp_path / "missing"), "./data/x", "a/b/c", "x.parquet"):
        with pytest.raises(FileNotFoundError, match="not a folder or .parquet file here|no such parquet"):
            load_source(spec)
    monkeypatch.undo()
    (tmp_path / "nometa").mkdir()
    (tmp_path / "nometa" / "metadata.jsonl").write_text('{"path": "a.png"}\n')
    with pytest.raises(ValueError, match="no 'file_name' column"):
        load_source(str(tmp_path / "nometa"))
