"""The built-in demo source and loading user sources."""

import json

import pytest
from datasets import Dataset

from safetypairs import schema as S
from safetypairs.instructions import demo_text
from safetypairs.policy import load_policy
from safetypairs.sources import DEMO_PHOTOS, build_demo_source, demo_photo, load_source


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
