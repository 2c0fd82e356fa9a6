"""Dataset card: Hub-valid YAML (configs, dataset_info, gating) and a body generated from the release."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from huggingface_hub import DatasetCard, DatasetCardData
from PIL import Image
from release_rows import validated_rows

from safetypairs import schema as S
from safetypairs.release.card import GRID_PATH, render_card, size_category, template_path
from safetypairs.release.publish import write_release
from safetypairs.release.assemble import ReleaseConfig, assemble
from safetypairs.validate.stage import ValidateConfig, run_validate

FUNNEL = [
    {"stage": "source", "rows_in": 9, "rows_out": 9, "statuses": {"ok": 9}},
    {"stage": "edit", "rows_in": 18, "rows_out": 18, "statuses": {"ok": 17, "no_text_found": 1}},
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    config = ReleaseConfig(split_by="source", license="cc-by-4.0", pretty_name="Tiny SafetyPairs")
    release = assemble(validated_rows(n_sources=9), config)
    out = write_release(release, tmp_path_factory.mktemp("card") / "ds", config, funnel=FUNNEL)
    return release, out


def test_yaml_parses_as_dataset_card_data(written):
    release, out = written
    card = DatasetCard.load(out / "README.md")
    assert isinstance(card.data, DatasetCardData)
    data = card.data.to_dict()
    assert data["license"] == "cc-by-4.0" and data["task_categories"] == ["image-classification"]
    assert data["size_categories"] == ["n<1K"] and "not-for-all-audiences" in data["tags"]
    assert data["extra_gated_prompt"] and any(v == "checkbox" for v in data["extra_gated_fields"].values())
    configs = {c["config_name"]: c for c in data["configs"]}
    assert set(configs) == {"pairs", "images", "rejected"} and configs["pairs"]["default"] is True
    assert {f["split"]: f["path"] for f in configs["images"]["data_files"]} == {
        "test": "data/images/test-*", "train": "data/images/train-*"}
    infos = {i["config_name"]: i for i in data["dataset_info"]}
    label = next(f for f in infos["images"]["features"] if f["name"] == "label")
    assert label["dtype"]["class_label"]["names"] == {"0": "safe", "1": "unsafe"}
    splits = {s["name"]: s["num_examples"] for s in infos["pairs"]["splits"]}
    assert splits == {name: len(ds) for name, ds in release["pairs"].items()}
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["pretty_name"] == "Tiny SafetyPairs"


def test_body_generated_from_the_data(written):
    release, out = written
    text = (out / "README.md").read_text()
    for code in set(release["pairs"]["test"][S.CATEGORY]):
        n_test = release["pairs"]["test"][S.CATEGORY].count(code)
        n_train = release["pairs"]["train"][S.CATEGORY].count(code)
        assert f"| {code} | " in text and f" {n_test} | {n_train} | {n_test + n_train} |" in text
    assert "Hate, Humiliation, Harassment" in text  # names from the built-in llavaguard policy
    assert "| edit | 18 | 18 | ok: 17, no_text_found: 1 |" in text  # the pipeline funnel given
    assert "| `not_local` |" in text and "the change covers too much of the image" in text  # reasons, meanings
    assert "`ocr-inpaint@test`" in text and "`llavaguard@1`" in text and "`template`" in text
    assert "arXiv:2510.21120" in text and "Content warning" in text and "confound" in text
    assert f"]({GRID_PATH})" in text
    assert "omposit" not in text  # validation did not composite these rows: the card says nothing about it
    grid = Image.open(out / GRID_PATH)
    assert grid.width == 3 * 256 and grid.height >= 256


def test_card_without_controls_or_grid_says_so(tmp_path):
    config = ReleaseConfig(include_rejected=False, n_examples=0)
    validated = validated_rows(n_sources=3).map(lambda r: {S.CONTROL_IMAGE: None})
    release = assemble(validated, config)
    out = write_release(release, tmp_path / "ds", config)
    text = (out / "README.md").read_text()
    assert "no `control` images" in text and "example_grid" not in text
    assert not (out / "assets").exists()
    assert [c["config_name"] for c in DatasetCard.load(out / "README.md").data.configs] == ["pairs", "images"]
    assert render_card(release, out, config).data.license == "cc-by-nc-4.0"


def test_template_ships_in_the_package_and_dataset_card_points_to_it():
    path = template_path()
    assert path.is_file() and path.read_text().startswith("---\n{{ card_data }}\n---")
    checkout = Path(__file__).resolve().parents[1] / "dataset_card" / "README.md.jinja"
    assert checkout.resolve() == path.resolve()


@pytest.mark.parametrize("n,label", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (3020, "1K<n<10K"),
                                     (9999, "1K<n<10K"), (10_000, "10K<n<100K"), (99_999, "10K<n<100K"),
                                     (100_000, "100K<n<1M"), (999_999, "100K<n<1M"), (10**6, "1M<n<10M")])
def test_size_category(n, label):
    assert size_category(n) == label


def test_size_category_counts_images_not_pairs(tmp_path):
    """400 pairs are 1,200 images: the Hub's size bucket is 1K<n<10K (the images config's rows), not n<1K."""
    from datasets import Dataset, DatasetDict

    from safetypairs.release.assemble import Release
    from safetypairs.release.card import card_data

    pairs = Dataset.from_dict({S.PAIR_ID: [f"p{i}" for i in range(400)]})
    images = Dataset.from_dict({S.PAIR_ID: [f"p{i // 3}" for i in range(1200)]})
    release = Release({"pairs": DatasetDict(test=pairs), "images": DatasetDict(test=images)})
    data = card_data(release, tmp_path, ReleaseConfig()).to_dict()
    assert data["size_categories"] == ["1K<n<10K"]
    infos = {i["config_name"]: i["splits"][0]["num_examples"] for i in data["dataset_info"]}
    assert infos == {"pairs": 400, "images": 1200}


def test_card_says_when_validation_composited_the_edits(tmp_path):
    config = ReleaseConfig(n_examples=0)
    validated, _ = run_validate(validated_rows(n_sources=4), ValidateConfig(device="cpu", composite=True))
    release = assemble(validated, config)
    n = len(release["pairs"]["test"])
    assert release.composited == n > 0
    text = (write_release(release, tmp_path / "ds", config) / "README.md").read_text()
    how_made, limitations = text.split("## How it was made")[1].split("## Limitations")
    assert f"**Composited:** {n} of {n} pairs were pasted back onto their originals (`validate --composite`)" in how_made
    assert "the safe image and the control are the original's pixels" in how_made
    assert f"**Composited edits.** {n} of {n} safe images" in limitations and "before compositing" in limitations
    plain, _ = run_validate(validated_rows(n_sources=4), ValidateConfig(device="cpu"))
    assert assemble(plain, config).composited == 0
