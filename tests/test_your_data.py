"""Bring your own data and your own guard: a LlavaGuard-style folder through the CLI, user guards, predictions files."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset
from user_data import CAPTIONED, SAFE, make_llavaguard_folder

from safetypairs import schema as S

from safetypairs import statuses as ST
from safetypairs.evaluate.metrics import compute_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
ALWAYS_UNSAFE = '''
from safetypairs.backends.base import Verdict


class AlwaysUnsafe:
    """A user's guard: plain labels are enough."""

    def classify(self, images, categories, policy):
        return ["unsafe"] * len(images)


class EveryOther:
    """A user's guard with scores, built through from_spec."""

    @classmethod
    def from_spec(cls, arg, device="cpu", **options):
        return cls()

    def classify(self, images, categories, policy):
        return [Verdict("unsafe" if im.size[0] % 2 else "safe", float(im.size[0] % 7), "w", "") for im in images]


class Broken:
    """A user's guard that fails on every batch (a wrong checkpoint, no GPU memory, ...)."""

    def classify(self, images, categories, policy):
        raise RuntimeError("CUDA out of memory")
'''


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(cwd)])}
    proc = subprocess.run([sys.executable, "-m", "safetypairs", "-q", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)
    return proc


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """generate -> validate (ocr-lexicon judge) -> release on a LlavaGuard-style folder, as a user types it."""
    root = tmp_path_factory.mktemp("user")
    make_llavaguard_folder(root / "llavaguard_data")
    steps = [
        ["generate", "--source", "llavaguard_data", "--instructor", "template", "--editor", "ocr-inpaint", "--control",
         "--device", "cpu", "--keep-columns", "rationale", "--out", "runs/g"],
        ["validate", "runs/g", "--judge", "ocr-lexicon", "--device", "cpu", "--out", "runs/v"],
        ["release", "runs/v", "--out", "runs/release"],
    ]
    for step in steps:
        proc = run_cli(*step, cwd=root)
        assert proc.returncode == 0, (step[0], proc.stderr[-3000:])
    (root / "my_guards.py").write_text(ALWAYS_UNSAFE)
    return root


def test_every_captioned_row_is_instructed_and_edited_and_safe_rows_set_aside(chain):
    from safetypairs.engine.datafiles import load_run

    rows = load_run(chain / "runs" / "g").select_columns(
        [S.SOURCE_ID, S.CATEGORY, S.INSTRUCT_STATUS, S.EDIT_STATUS, S.CANDIDATE]).to_list()
    by_id = {r[S.SOURCE_ID]: r for r in rows}
    assert sorted(by_id) == sorted(f"images/{p}.jpg" for p in [c for c, _ in CAPTIONED] + SAFE)
    for photo, _ in CAPTIONED:
        row = by_id[f"images/{photo}.jpg"]
        assert (row[S.INSTRUCT_STATUS], row[S.EDIT_STATUS], row[S.CATEGORY]) == ("ok", "ok", "O1"), row
    for photo in SAFE:
        assert by_id[f"images/{photo}.jpg"][S.INSTRUCT_STATUS] == ST.NOT_UNSAFE
    validated = load_run(chain / "runs" / "v")
    reasons = dict(zip(validated[S.SOURCE_ID], validated[S.REJECT_REASON]))
    assert {reasons[f"images/{p}.jpg"] for p in SAFE} == {ST.NOT_UNSAFE}
    assert all(validated[S.LABEL_FLIP_CHECKED][i] for i, ok in enumerate(validated[S.ACCEPTED]) if ok)


def test_released_pairs_name_their_source_files_and_load_with_plain_datasets(chain):
    release = chain / "runs" / "release"
    pairs = load_dataset(str(release), split="test")
    assert len(pairs) >= 3  # the ocr-lexicon judge may reject a hard edit; most pass
    files = {f"images/{p}.jpg": c for p, c in CAPTIONED}
    for row in pairs:
        assert row[S.SOURCE_ID] in files and (chain / "llavaguard_data" / row[S.SOURCE_ID]).is_file()
        assert files[row[S.SOURCE_ID]] in row[S.RATIONALE] and row[S.CATEGORY] == "O1"
        meta = json.loads(row[S.SOURCE_META])
        assert meta["rating"] == "Unsafe" and files[row[S.SOURCE_ID]] in meta["rationale"]  # --keep-columns
        assert row[S.LABEL_FLIP_CHECKED] is True and row[S.JUDGE] == "ocr-lexicon"
    images = load_dataset(str(release), "images", split="test")
    assert images.features[S.ROLE].names == list(S.ROLES)
    assert set(images[S.IMAGE_ID]) == {f"{p}-{S.ROLES[r]}" for p, r in zip(images[S.PAIR_ID], images[S.ROLE])}
    rejected = load_dataset(str(release), "rejected", split="test")
    assert {s for s, r in zip(rejected[S.SOURCE_ID], rejected[S.REJECT_REASON]) if r == ST.NOT_UNSAFE} == {
        f"images/{p}.jpg" for p in SAFE}
    card = (release / "README.md").read_text()
    assert "| sources | 6 | 4 | not_unsafe: 2 |" in card and "| instructed |" in card
    assert "roles=images[\"role\"]" in card


def test_the_cards_recipe_scores_an_always_unsafe_guard_at_f1_two_thirds(chain):
    images = load_dataset(str(chain / "runs" / "release"), "images", split="test")
    assert "control" in S.role_names(images[S.ROLE])
    predictions = ["unsafe"] * len(images)
    with_roles = compute_metrics(predictions, images["label"], images["pair_id"], images["category"],
                                 roles=images["role"], n_bootstrap=0)
    without = compute_metrics(predictions, images["label"], images["pair_id"], images["category"], n_bootstrap=0)
    assert with_roles["f1"] == pytest.approx(2 / 3) and without["f1"] == pytest.approx(0.8)


def test_a_user_guard_and_a_predictions_file_score_like_the_builtin_path(chain):
    proc = run_cli("evaluate", "--dataset", "runs/release", "--guard", "my_guards:AlwaysUnsafe", "--guard",
                   "my_guards:EveryOther", "--guard", "ocr-lexicon", "--device", "cpu", "--bootstrap", "50",
                   "--out", "runs/eval", cwd=chain)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((chain / "runs" / "eval" / "results.json").read_text())
    always = evaluated["guards"]["my_guards:AlwaysUnsafe"]["metrics"]
    assert always["f1"] == pytest.approx(2 / 3) and always["pair_accuracy"] == 0.0
    # the ocr-lexicon guard shares the judge's backend: the warning is in results.json and the report
    assert "Circular by construction" in evaluated["notes"]["ocr-lexicon"]
    assert evaluated["guards"]["ocr-lexicon"]["warnings"] and "my_guards:EveryOther" not in evaluated["notes"]
    assert "Circular by construction" in (chain / "runs" / "eval" / "report.html").read_text()
    # the same predictions, made elsewhere, written to a file keyed by image_id
    images = evaluated["images"]
    preds = evaluated["predictions"]["my_guards:EveryOther"]
    ids = [S.image_id(p, r) for p, r in zip(images["pair_id"], images["role"])]
    with open(chain / "preds.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "prediction", "score"])
        writer.writerows(zip(ids, preds["pred"], preds["score"]))
    proc = run_cli("score", "--dataset", "runs/release", "--predictions", "preds.csv", "--bootstrap", "50",
                   "--out", "runs/score", cwd=chain)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = json.loads((chain / "runs" / "score" / "results.json").read_text())
    assert scored["guards"]["file:preds.csv"]["metrics"] == evaluated["guards"]["my_guards:EveryOther"]["metrics"]
    assert (chain / "runs" / "score" / "report.html").is_file()


def test_a_guard_that_answered_no_image_fails_the_command_after_the_results_are_written(chain):
    proc = run_cli("evaluate", "--dataset", "runs/release", "--guard", "my_guards:Broken", "--guard", "ocr-lexicon",
                   "--device", "cpu", "--bootstrap", "20", "--out", "runs/broken", cwd=chain)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "my_guards:Broken answered no image: {'guard_error': " in proc.stderr and "CUDA out of memory" in proc.stderr
    results = json.loads((chain / "runs" / "broken" / "results.json").read_text())
    assert results["guards"]["ocr-lexicon"]["metrics"]["pair_accuracy"] == 1.0  # the other guard's numbers stay
    assert any(w.startswith("answered no image") for w in results["guards"]["my_guards:Broken"]["warnings"])
    assert "answered no image" in (chain / "runs" / "broken" / "report.html").read_text()


def test_score_refuses_a_file_of_another_release(chain):
    (chain / "other.jsonl").write_text(json.dumps({"image_id": "sp-0000-original", "prediction": 1}) + "\n")
    proc = run_cli("score", "--dataset", "runs/release", "--predictions", "other.jsonl", "--out", "runs/x", cwd=chain)
    assert proc.returncode == 2 and "not in this release split" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["generate", "--source", "no_such_folder", "--out", "x"], "--source 'no_such_folder' is not a file or folder here"),
    (["generate", "--source", "llavaguard_data", "--editor", "ocr-inpaint:radius=abc", "--out", "x"],
     "option radius must be an integer, got 'abc'"),
    (["generate", "--source", "llavaguard_data", "--category-column", "rationale", "--out", "x"],
     "4 row(s): category \"The caption"),
    (["evaluate", "--dataset", "runs/v", "--guard", "ocr-lexicon", "--out", "x"], "`safetypairs release"),
    (["evaluate", "--dataset", "runs/release", "--guard", "my_guards:Nope", "--out", "x"], "cannot import guard"),
])
def test_input_errors_are_one_line_before_any_work(chain, args, message):
    proc = run_cli(*args, cwd=chain)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (chain / "x").exists()


def test_every_status_written_is_a_word_of_the_vocabulary_and_one_word_per_fate(chain):
    """Run folders, the release's rejected config, the funnel and the card use the words of `statuses`, and a row
    that stopped at a stage carries that stage's status as its fate (the funnel and the card agree)."""
    from safetypairs.engine.datafiles import load_run

    validated = load_run(chain / "runs" / "v")
    written = [v for c in validated.column_names if c.endswith("_status") or c == S.REJECT_REASON
               for v in validated[c]]
    rejected = load_dataset(str(chain / "runs" / "release"), "rejected", split="test")
    written += [v for c in (S.EDIT_STATUS, S.VALIDATE_STATUS, S.REJECT_REASON) for v in rejected[c]]
    unknown = sorted({v for v in written if not ST.is_known(v)})
    assert not unknown, unknown
    for instruct, fate in zip(validated[S.INSTRUCT_STATUS], validated[S.REJECT_REASON]):
        if instruct != ST.OK:
            assert fate == instruct  # not renamed on the way (it used to be not_instructed in the card)
    card = (chain / "runs" / "release" / "README.md").read_text()
    for reason in set(rejected[S.REJECT_REASON]):
        assert f"| `{reason}` |" in card and ST.meaning(reason) in card


def _write_predictions(chain, name, rows):
    with open(chain / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_score_names_missing_unparsable_and_unreadable_cells_and_never_tracebacks(chain):
    images = load_dataset(str(chain / "runs" / "release"), "images", split="test")
    ids = list(images["image_id"])
    rows = [{"image_id": i, "prediction": "unsafe", "score": 0.9} for i in ids]
    rows[0]["prediction"] = "maybe"          # unparsable: an unknown answer (an error), named
    rows[1]["score"] = "n/a"                 # a score that is not a number: left out of AUROC, named
    rows[2]["prediction"] = 1                # mixed types in one column are read, not a pyarrow error
    missing = rows.pop(-1)["image_id"]       # an image with no row
    _write_predictions(chain, "partial.jsonl", rows)
    proc = run_cli("score", "--dataset", "runs/release", "--predictions", "partial.jsonl", "--out", "runs/p",
                   cwd=chain)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"1 of {len(ids)} images have no prediction" in proc.stderr and missing in proc.stderr
    assert "--allow-missing" in proc.stderr and not (chain / "runs" / "p").exists()
    proc = run_cli("score", "--dataset", "runs/release", "--predictions", "partial.jsonl", "--allow-missing",
                   "--bootstrap", "20", "--out", "runs/p", cwd=chain)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((chain / "runs" / "p" / "results.json").read_text())
    problems = results["predictions_file"]
    assert problems["missing"] == {"n": 1, "first": [missing]}
    assert problems["unparsable"] == {"n": 1, "first": [ids[0]]}
    assert problems["unreadable_scores"] == {"n": 1, "first": [ids[1]]}
    statuses = results["guards"]["file:partial.jsonl"]["statuses"]
    assert statuses == {"ok": len(ids) - 2, "unparsable": 1, "missing": 1}
    warnings = " ".join(results["guards"]["file:partial.jsonl"]["warnings"])
    assert ids[0] in warnings and ids[1] in warnings and missing in warnings
    assert "not safe/unsafe" in (chain / "runs" / "p" / "report.html").read_text()


def _unsafebench_folder(root, bom=True):
    """UnsafeBench's own layout: `image` (not file_name), `safety_label` Safe/Unsafe, `category` Hate/Spam/..."""
    (root / "imgs").mkdir(parents=True)
    from safetypairs.sources import demo_photo

    rows = [("coffee", "Unsafe", "Hate"), ("rocket", "Safe", "Spam"), ("moon", "Unsafe", "Violence")]
    for photo, _, _ in rows:
        demo_photo(photo).resize((64, 64)).save(root / "imgs" / f"{photo}.png")
    with open(root / "metadata.csv", "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "safety_label", "category"])
        writer.writerows((f"imgs/{p}.png", label, cat) for p, label, cat in rows)
    return root


def test_unsafebench_metadata_with_a_byte_order_mark_reads_like_any_image_folder(tmp_path):
    from safetypairs.sources import SourceColumns, load_source

    folder = _unsafebench_folder(tmp_path / "ub")
    rows = load_source(str(folder))
    assert list(rows["source_id"]) == ["imgs/coffee.png", "imgs/rocket.png", "imgs/moon.png"]
    assert list(rows["source_label"]) == ["unsafe", "safe", "unsafe"] and rows[0]["image"].size == (64, 64)
    renamed = tmp_path / "ub2"
    folder.rename(renamed)
    text = (renamed / "metadata.csv").read_text(encoding="utf-8-sig").replace("image,", "path,", 1)
    (renamed / "metadata.csv").write_text(text, encoding="utf-8-sig")
    with pytest.raises(ValueError, match="no 'file_name' column .*columns: path, safety_label, category; pass "
                                         "--image-column"):
        load_source(str(renamed))
    assert len(load_source(str(renamed), columns=SourceColumns(image="path"))) == 3


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"file_name": "imgs/coffee.png"}\n{"file_name": oops}\n', "metadata.jsonl line 2: not valid JSON"),
    ('["imgs/coffee.png"]\n', "metadata.jsonl line 1: expected a JSON object, got list"),
    ('{"file_name": "../outside.png"}\n', "leaves the folder"),
    ('{"file_name": "/etc/passwd"}\n', "leaves the folder"),
    ('{"file_name": "imgs/nope.png"}\n', "image file 'imgs/nope.png' does not exist"),
])
def test_a_broken_metadata_file_is_one_line_naming_the_file_and_line(tmp_path, content, message):
    folder = _unsafebench_folder(tmp_path / "f")
    (folder / "metadata.csv").unlink()
    (folder / "metadata.jsonl").write_text(content)
    (tmp_path / "outside.png").write_bytes((folder / "imgs" / "coffee.png").read_bytes())
    proc = run_cli("generate", "--source", str(folder), "--out", str(tmp_path / "g"), cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_link_that_leaves_the_image_folder_is_refused(tmp_path):
    from safetypairs.sources import load_source

    folder = _unsafebench_folder(tmp_path / "f", bom=False)
    (tmp_path / "secret.png").write_bytes((folder / "imgs" / "coffee.png").read_bytes())
    (folder / "imgs" / "coffee.png").unlink()
    (folder / "imgs" / "coffee.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match="'imgs/coffee.png' leaves the folder .* through a link; pass --follow-links"):
        load_source(str(folder))


def test_follow_links_reads_a_link_that_leaves_the_folder(tmp_path):
    from safetypairs.sources import SourceColumns, load_source

    folder = _unsafebench_folder(tmp_path / "f", bom=False)
    (tmp_path / "secret.png").write_bytes((folder / "imgs" / "coffee.png").read_bytes())
    (folder / "imgs" / "coffee.png").unlink()
    (folder / "imgs" / "coffee.png").symlink_to(tmp_path / "secret.png")
    rows = load_source(str(folder), columns=SourceColumns(follow_links=True))
    assert rows[0]["source_id"] == "imgs/coffee.png" and rows[0]["image"].size == (64, 64)
