"""Image cells checked once: the run writer records what it decoded, and a later write or pixel digest of the same
bytes (the next stage, the release) decodes nothing; changed bytes are decoded again."""

from __future__ import annotations

import hashlib
import io

import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from release_rows import photo, validated_rows

from safetypairs import schema as S
from safetypairs.engine import imagechecks
from safetypairs.engine.datafiles import DataFiles, write_parquet
from safetypairs.release.assemble import ReleaseConfig
from safetypairs.release.publish import write_release

FEATURES = Features({"source_id": Value("string"), "image": Image()})


def _png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> str:
    """The pixel digest written out independently: SHA-256 of mode, size and RGB bytes, 16 hex characters."""
    rgb = PILImage.open(io.BytesIO(data)).convert("RGB")
    return hashlib.sha256(f"RGB{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Every full decode the checks make (`images.check_cell`, `images.load_image` inside `imagechecks`)."""
    calls: list[int] = []
    for name in ("check_cell", "load_image"):
        original = getattr(imagechecks, name)
        monkeypatch.setattr(imagechecks, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    return calls


def _rows(cells: list[bytes | None]) -> Dataset:
    return Dataset.from_dict({"source_id": [f"s{i}" for i in range(len(cells))],
                              "image": [None if c is None else {"bytes": c, "path": None} for c in cells]},
                             features=FEATURES)


def test_the_writer_records_each_cell_it_checked_and_skips_the_decode_for_the_same_bytes(tmp_path, decodes):
    images = [_png(photo("astronaut", 40)), _png(photo("coffee", 48))]
    write_parquet(_rows([*images, b"not an image", None]), tmp_path / "a.parquet", record=True)
    assert len(decodes) == 3  # the two images and the corrupt cell; a null cell is not decoded
    table = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert table[2]["image"] is None and table[2][S.IMAGE_CHECKS] == [] and table[3][S.IMAGE_CHECKS] == []
    for row, data in zip(table, images):
        assert row[S.IMAGE_CHECKS] == [{"sha256": hashlib.sha256(data).hexdigest()[:32], "digest": _pixels(data),
                                        "pixels": PILImage.open(io.BytesIO(data)).width ** 2}]

    decodes.clear()
    again = DataFiles((tmp_path / "a.parquet",)).rows()
    write_parquet(again, tmp_path / "b.parquet", record=True)
    assert decodes == []  # the next stage's write of the same bytes
    assert pq.read_table(tmp_path / "b.parquet").equals(pq.read_table(tmp_path / "a.parquet"))

    changed = _png(photo("rocket", 40))
    stored = again.cast_column("image", Image(decode=False))
    edited = stored.map(lambda row, i: {"image": {"bytes": changed, "path": None} if i == 1 else row["image"]},
                        with_indices=True, features=stored.features)
    write_parquet(edited, tmp_path / "c.parquet", record=True)
    assert len(decodes) == 1  # only the cell whose bytes changed
    assert pq.read_table(tmp_path / "c.parquet")[S.IMAGE_CHECKS][1].as_py()[0]["digest"] == _pixels(changed)


def test_a_record_is_not_trusted_beyond_its_pixel_cap_and_is_left_out_unless_asked_for(tmp_path, decodes):
    write_parquet(_rows([_png(photo("astronaut", 40))]), tmp_path / "a.parquet", record=True)
    rows = DataFiles((tmp_path / "a.parquet",)).rows()
    decodes.clear()
    assert write_parquet(rows, tmp_path / "small.parquet", max_pixels=400) == {"image: too_large": 1}  # a PNG
    assert decodes and S.IMAGE_CHECKS not in pq.read_schema(tmp_path / "small.parquet").names
    decodes.clear()
    known = imagechecks.recorded(rows[S.IMAGE_CHECKS])
    write_parquet(rows.remove_columns([S.IMAGE_CHECKS]), tmp_path / "known.parquet", known=known)
    assert decodes == []


def test_a_release_of_checked_rows_reuses_their_digests_and_decodes_nothing(tmp_path, decodes):
    rows = validated_rows(n_sources=4, size=48)
    write_parquet(rows, tmp_path / "run.parquet", record=True)
    checked = DataFiles((tmp_path / "run.parquet",)).rows()
    decodes.clear()
    out = write_release(checked, tmp_path / "release", ReleaseConfig())
    assert decodes == []  # pair ids, the images config's digests and every write took the records
    plain = write_release(rows, tmp_path / "plain", ReleaseConfig())  # in memory: nothing recorded, all decoded
    assert decodes
    for config in ("pairs", "images"):
        ours = pq.read_table(sorted((out / "data" / config).glob("*.parquet"))).to_pylist()
        theirs = pq.read_table(sorted((plain / "data" / config).glob("*.parquet"))).to_pylist()
        assert ours == theirs and S.IMAGE_CHECKS not in ours[0]
    for row in pq.read_table(sorted((out / "data" / "images").glob("*.parquet"))).to_pylist():
        assert row[S.IMAGE_DIGEST] == _pixels(row[S.IMAGE]["bytes"])


def _with_mask(batch, rank=None):
    """A stage that passes the image through and makes a new 8x8 L mask per row (as validation makes its edit mask)."""
    return {"image": batch["image"], "mask": [PILImage.new("L", (8, 8), 40 * i) for i in range(len(batch["image"]))],
            "status": ["ok"] * len(batch["image"])}


def test_a_runner_stage_over_checked_rows_decodes_none_of_its_images_and_records_the_new_ones(tmp_path, decodes):
    from safetypairs.engine.datafiles import load_run
    from safetypairs.engine.runner import RunConfig, run_stage
    from safetypairs.engine.stage import map_stage

    def run(rows: Dataset, name: str) -> Dataset:
        features = Features({**rows.features, "mask": Image(), "status": Value("string")})

        def compute(chunk: Dataset, device: str):
            out, result = map_stage(chunk, _with_mask, stage="masks", features=features, status_column="status")
            return out, {"masks": result.statuses}

        run_stage(rows, compute, stage="masks", settings={}, run=RunConfig(out=tmp_path / name, chunk_size=2),
                  device="cpu")
        return load_run(tmp_path / name)

    images = [_png(photo("astronaut", 40)), _png(photo("coffee", 48)), _png(photo("rocket", 40))]
    write_parquet(_rows(images), tmp_path / "input.parquet", record=True)
    checked = DataFiles((tmp_path / "input.parquet",)).rows()
    decodes.clear()
    written = run(checked, "checked")
    assert decodes == []  # 3 input images recorded upstream, 3 masks recorded as they were stored
    decodes.clear()
    plain = run(_rows(images), "plain")
    assert len(decodes) == 6  # nothing recorded upstream: 3 input images; masks of unrecorded rows: 3 more
    for rows in (written, plain):
        stored = rows.cast_column("mask", Image(decode=False)).cast_column("image", Image(decode=False))
        for i, row in enumerate(stored):
            mask = PILImage.open(io.BytesIO(row["mask"]["bytes"]))
            assert mask.mode == "L" and set(mask.getdata()) == {40 * (i % 2)}  # chunks of 2: i = 0, 1 per chunk
            assert row["image"]["bytes"] == images[i]
            assert sorted(r["sha256"] for r in row[S.IMAGE_CHECKS]) == sorted(
                hashlib.sha256(c).hexdigest()[:32] for c in (images[i], row["mask"]["bytes"]))
