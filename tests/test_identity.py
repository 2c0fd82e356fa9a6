"""Image identity: digests decide "same image", source groups decide "same source", file names decide nothing."""

import hashlib

import numpy as np
from datasets import Dataset
from PIL import Image

from safetypairs.identity import (
    exclude_shared,
    identity_of,
    image_digests,
    merged_groups,
    with_digests,
)
from safetypairs.statuses import SAME_IMAGE, SAME_SOURCE
from safetypairs.statuses import SAME_SOURCE_ID as SAME_ID


def _pixels_digest(image: Image.Image) -> str:
    """An independent digest: SHA-256 over mode, size and the RGB bytes (what the docs promise)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"RGB{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]


def _image(value: int, size=(8, 6)) -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8))


def test_digest_is_of_pixels_not_of_the_file():
    import io

    image = _image(40)
    buffers = []
    for level in (0, 9):  # two PNG encodings of the same pixels: different bytes, one identity
        out = io.BytesIO()
        image.save(out, format="PNG", compress_level=level)
        buffers.append(out.getvalue())
    assert buffers[0] != buffers[1]
    digests = image_digests([{"bytes": b, "path": None} for b in buffers] + [image.convert("L"), None, b"not an image"])
    assert digests[0] == digests[1] == _pixels_digest(image)
    assert digests[2] == _pixels_digest(image.convert("L"))  # grey 40 read as RGB: the same pixels
    assert digests[3] is None and digests[4] is None


def test_same_file_name_in_two_folders_is_not_a_shared_source():
    """Two folders both hold images/safe_00.png, with different photos: ids match, identity does not."""
    train = identity_of({"source_id": ["images/safe_00.png", "images/unsafe_00.png"],
                         "image_digest": ["aaa", "bbb"]}, "base")
    evaluation = identity_of({"source_id": ["images/safe_00.png", "images/unsafe_00.png", "images/x.png"],
                              "image_digest": ["ccc", "bbb", "ddd"]}, "eval")
    out = exclude_shared(evaluation, train)
    assert out.keep.tolist() == [True, False, True]
    assert out.counts == {SAME_IMAGE: 1}
    assert out.by == "image digest" and out.id_matches_kept == 1
    assert "share only a source id" in out.describe()


def test_an_edit_of_a_training_original_shares_its_source():
    """Eval = a release's images (grouped by source id): the original is a training image, so its edit and
    control go too; training = natural rows named by file."""
    train = identity_of({"source_id": ["photos/a.jpg", "photos/b.jpg"], "image_digest": ["orig-a", "nat-b"]}, "base")
    evaluation = identity_of({"source_id": ["photos/a.jpg", "photos/a.jpg", "photos/a.jpg", "photos/c.jpg"],
                              "pair_id": ["sp-1", "sp-1", "sp-1", "sp-2"],
                              "image_digest": ["orig-a", "edit-a", "control-a", "orig-c"]}, "eval")
    out = exclude_shared(evaluation, train)
    assert out.reasons.tolist() == [SAME_IMAGE, SAME_SOURCE, SAME_SOURCE, None]
    assert out.summary() == {"rows": 4, "kept": 1, "excluded": {SAME_IMAGE: 1, SAME_SOURCE: 2},
                             "compared_by": "image digest", "source_id_matches_kept": 0}


def test_without_digests_source_ids_are_compared_and_it_says_so():
    train = identity_of({"source_id": ["s1", "s2"]}, "base")
    evaluation = identity_of({"source_id": ["s2", "s3"]}, "eval")
    out = exclude_shared(evaluation, train)
    assert out.reasons.tolist() == [SAME_ID, None] and out.by == "source id"


def test_a_row_without_a_digest_falls_back_to_its_id():
    train = identity_of({"source_id": ["s1"], "image_digest": ["d1"]}, "base")
    evaluation = identity_of({"source_id": ["s1", "s9"], "image_digest": [None, "d1"]}, "eval")
    out = exclude_shared(evaluation, train)
    assert out.reasons.tolist() == [SAME_ID, SAME_IMAGE]
    assert out.by == "image digest, source id where a row has none"


def test_merged_groups_join_sources_that_share_an_image():
    natural = identity_of({"source_id": ["a.png", "b.png"], "image_digest": ["d-a", "d-b"]}, "train")
    pairs = identity_of({"source_id": ["a.png", "a.png", "z.png", "z.png"],
                         "image_digest": ["d-a", "d-a-edit", "d-z", "d-z-edit"]}, "pairs")
    groups = merged_groups(natural, pairs)
    assert groups[0] == groups[2] == groups[3]  # the natural a.png and the pair made from it
    assert len({groups[0], groups[1], groups[4]}) == 3 and groups[4] == groups[5]


def test_with_digests_adds_the_column_once():
    rows = Dataset.from_dict({"image": [_image(1), _image(2)]})
    out = with_digests(rows)
    assert out["image_digest"] == [_pixels_digest(_image(1)), _pixels_digest(_image(2))]
    assert with_digests(out) is out
