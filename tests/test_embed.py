"""Embed stage: tiny random open_clip through the real embed path, the ocr-text encoder, cached embed_run."""

import hashlib

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage
from tiny_models import build_tiny_open_clip
from user_data import CAPTIONED, SAFE, make_llavaguard_folder

from safetypairs import schema as S
from safetypairs.backends.ocr_text import (
    NO_TEXT,
    hash_features,
    word_ngrams,
)
from safetypairs.engine.datafiles import load_run
from safetypairs.probes.embed import (
    EmbedConfig,
    run_embed,
    load_embedded,
    load_images,
    embed_run,
)
from safetypairs.backends.registry import check_options, load_backend
from safetypairs.sources import demo_photo, render_demo_row

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")
FEATURES = Features({"image": Image(), "label": ClassLabel(names=S.LABELS), "source_id": Value("string"),
                     "pair_id": Value("string"), "role": Value("string")})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return f"open_clip:{build_tiny_open_clip(tmp_path_factory.mktemp('clip'))}"


def _photos(bad_row: int | None = None) -> Dataset:
    rows = {"image": [demo_photo(n).resize((48, 40)) for n in PHOTOS], "label": [i % 2 for i in range(len(PHOTOS))],
            "source_id": [f"s{i}" for i in range(len(PHOTOS))], "pair_id": [f"p{i // 2}" for i in range(len(PHOTOS))],
            "role": ["original", "edited"] * (len(PHOTOS) // 2)}
    if bad_row is not None:
        rows["image"][bad_row] = {"bytes": b"not an image", "path": None}
    return Dataset.from_dict(rows, features=FEATURES)


class _Counting:
    """Wraps an encoder backend's ``embed`` and counts the images it is called with."""

    def __init__(self, monkeypatch, spec):
        self.backend = load_backend("encoders", spec, "cpu")
        self.images = 0
        original = self.backend.embed

        def counted(images):
            self.images += len(images)
            return original(images)

        monkeypatch.setattr(self.backend, "embed", counted)


def test_tiny_open_clip_through_the_embed_stage(tiny_clip):
    dataset = _photos(bad_row=3)
    out, result = run_embed(dataset, EmbedConfig(encoder=tiny_clip, batch_size=4, device="cpu"))
    assert out.column_names == ["pair_id", "role", "label", "source_id", "embedding", "image_digest", "embed_status",
                                "embed_error"]
    assert out.features["label"] == FEATURES["label"] and len(out) == len(dataset)
    assert out["embed_status"] == ["ok", "ok", "ok", "unreadable", "ok", "ok"]
    assert out[3]["embedding"] is None and "row s3" in out[3]["embed_error"] and out[3]["image_digest"] is None
    rgb = demo_photo(PHOTOS[0]).resize((48, 40)).convert("RGB")  # the digest: SHA-256 of mode, size and pixels
    assert out[0]["image_digest"] == hashlib.sha256(f"RGB{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]
    got = np.array([out[i]["embedding"] for i in (0, 1, 2, 4, 5)], dtype=np.float32)
    encoder = load_backend("encoders", tiny_clip, "cpu")
    bare = encoder.embed([demo_photo(PHOTOS[i]).resize((48, 40)) for i in (0, 1, 2, 4, 5)])
    np.testing.assert_allclose(got, bare, atol=1e-5)  # the stage adds nothing to the bare encoder's numbers
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_embed_config_checks_values(tiny_clip):
    with pytest.raises(ValueError, match="does not embed images; allowed: hf-clip, ocr-text, open_clip"):
        EmbedConfig(encoder="lpips:alex")
    with pytest.raises(ValueError, match="Did you mean 'ocr-text'"):
        EmbedConfig(encoder="ocr-txt")
    with pytest.raises(ValueError, match="batch_size"):
        EmbedConfig(encoder=tiny_clip, batch_size=0)
    with pytest.raises(ValueError, match="no image column 'picture'"):
        run_embed(_photos(), EmbedConfig(encoder=tiny_clip, image_column="picture"))


def test_run_embed_reuses_a_finished_run_without_encoder_calls(tmp_path, monkeypatch, tiny_clip):
    from safetypairs.engine.runner import RunConfig

    counter = _Counting(monkeypatch, tiny_clip)
    dataset, config = _photos(), EmbedConfig(encoder=tiny_clip, device="cpu")
    first = embed_run(dataset, config, RunConfig(out=tmp_path / "emb", chunk_size=4))
    assert counter.images == len(dataset) and first.chunks_computed == 2
    rows = load_run(tmp_path / "emb")
    again = embed_run(dataset, config, RunConfig(out=tmp_path / "emb", chunk_size=4))
    assert counter.images == len(dataset), "a second run on the same data and encoder made encoder calls"
    assert again.chunks_computed == 0 and load_run(tmp_path / "emb")["embedding"] == rows["embedding"]
    assert rows["source_id"] == dataset["source_id"] and rows["embed_status"] == ["ok"] * len(dataset)
    assert load_embedded(str(tmp_path / "emb"), tiny_clip)["embedding"] == rows["embedding"]
    with pytest.raises(ValueError, match="holds embeddings of"):
        load_embedded(str(tmp_path / "emb"), "ocr-text")


def test_word_ngrams_and_hashing_are_stable():
    assert word_ngrams("You are A loser!", 2) == ["you", "are", "a", "loser", "you are", "are a", "a loser"]
    assert word_ngrams("  ", 2) == [NO_TEXT]
    a, b = hash_features(["you", "loser"], 64), hash_features(["you", "loser"], 64)
    assert np.array_equal(a, b) and np.isclose(np.linalg.norm(a), 1.0)
    with pytest.raises(ValueError, match="allowed: dim, ngrams, max_side"):
        check_options("encoders", "ocr-text:size=3")
    with pytest.raises(ValueError, match=r"dim must be an integer, got 'big'"):
        check_options("encoders", "ocr-text:dim=big")
    with pytest.raises(ValueError, match=r"ngrams=7 \(allowed: \[1, 4\]\)"):
        check_options("encoders", "ocr-text:ngrams=7")


def test_ocr_text_embeds_what_rapidocr_reads():
    encoder = load_backend("encoders", "ocr-text:dim=256")
    assert encoder.name == "ocr-text:dim=256,ngrams=2"
    rows = [render_demo_row(i, 0) for i in range(2)]
    captions = [r["source_meta"] for r in rows]
    plain = demo_photo("coffee")
    texts = encoder.texts([rows[0]["image"], plain])
    assert texts[0] in captions[0] and texts[1] == ""
    emb = encoder.embed([rows[0]["image"], rows[0]["image"].transpose(PILImage.Transpose.FLIP_LEFT_RIGHT), plain])
    assert emb.shape == (3, 256) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(emb[0], hash_features(word_ngrams(texts[0], 2), 256))
    np.testing.assert_allclose(emb[2], hash_features([NO_TEXT], 256))
    small = load_backend("encoders", "ocr-text:dim=256,max_side=320")
    assert small.name.endswith(",max_side=320") and small.texts([rows[0]["image"]]) == texts[:1]


def test_an_image_folder_loads_like_a_source_with_labels_from_its_rating(tmp_path):
    rows = load_images(str(make_llavaguard_folder(tmp_path / "labelled")))
    assert rows[S.LABEL] == [1] * len(CAPTIONED) + [0] * len(SAFE)  # rating Unsafe / Safe
    assert rows[S.SOURCE_ID][0] == f"images/{CAPTIONED[0][0]}.jpg" and rows[0][S.IMAGE].size[0] > 0
    plain = tmp_path / "plain"
    plain.mkdir()
    demo_photo("coins").save(plain / "coins.png")
    (plain / "metadata.jsonl").write_text('{"file_name": "coins.png"}\n')
    unlabelled = load_images(str(plain))  # embedding needs no label: the row stays
    assert len(unlabelled) == 1 and S.LABEL not in unlabelled.column_names

