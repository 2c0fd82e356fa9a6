"""Tests for safetypairs.evaluate.report: renders offline, self-contained, and shows in headless Chromium."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw
from skimage import data

from safetypairs.evaluate.stage import EvaluateConfig
from safetypairs.evaluate.report import render_report
from safetypairs.evaluate.scoring import guard_columns, score_predictions, unanswered

GUARDS = ("ocr-lexicon", "nudenet")


def _results_and_pairs():
    rng = np.random.default_rng(0)
    table = {"label": [], "category": [], "pair_id": [], "role": []}
    pairs = []
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"]):
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((96, 96))
        edited = image.copy()
        ImageDraw.Draw(edited).rectangle([20, 20, 60, 40], fill=(200, 180, 90))
        mask = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(mask).rectangle([20, 20, 60, 40], fill=255)
        pairs.append({"pair_id": f"p{i}", "category": "O1", "unsafe_image": image, "safe_image": edited,
                      "edit_mask": mask, "instruction": f"Replace the text <b>loser{i}</b>", "changed_fraction": 0.09})
        for role, label in (("original", "unsafe"), ("edited", "safe"), ("control", "unsafe")):
            for key, value in zip(table, (label, "O1", f"p{i}", role)):
                table[key].append(value)
    n = len(table["label"])
    for spec in GUARDS:
        cols = guard_columns(spec)
        table[cols["pred"]] = rng.choice(["safe", "unsafe", "unknown"], size=n).tolist()
        table[cols["score"]] = rng.random(n).tolist()
        table[cols["rationale"]] = ["r"] * n
    results = score_predictions(table, EvaluateConfig(guards=GUARDS, n_bootstrap=50))
    results["dataset"] = {"fingerprint": "0123456789abcdef", "n_rows": n}
    return results, pairs


FUNNEL = [{"stage": "source", "rows_in": 4, "rows_out": 4, "statuses": {"ok": 4}},
          {"stage": "validate", "rows_in": 4, "rows_out": 4, "kept": 3, "statuses": {"accepted": 3, "judge_still_unsafe": 1}}]


def test_render_report_is_self_contained(tmp_path):
    results, pairs = _results_and_pairs()
    note = "same model as the validation judge"
    path = render_report(results, tmp_path / "out" / "report.html", pairs=pairs, funnel=FUNNEL,
                         notes={"ocr-lexicon": note})
    html = path.read_text()
    assert html.count("data:image/") >= 3 * 4  # unsafe, safe and mask per pair, inline
    assert not re.search(r'src="(?!data:)', html) and "<script" not in html
    for text in ("Leaderboard", "Pipeline funnel", "judge_still_unsafe", note, "ROC curves", "Confusion matrices",
                 "Pairs most guards get wrong"):
        assert text in html
    assert "&lt;b&gt;loser0&lt;/b&gt;" in html  # user text is escaped


LEADERBOARD_COLUMNS = ("pair_accuracy", "f1", "balanced_accuracy", "recall", "specificity", "auroc",
                       "same_label_rate", "flip_detection_rate")


def _leaderboard_cells(html: str) -> dict[str, list[tuple[str, str]]]:
    """Guard -> the (value, interval) text of each metric cell of the leaderboard table, left to right."""
    section = html.split('<section id="leaderboard">', 1)[1].split("</section>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", section, re.S)[1:]:  # the first is the header
        guard = re.search(r"<b>([^<]+)</b>", row).group(1)
        rows[guard] = re.findall(r'<td>([^<]*)<span class="ci">([^<]*)</span></td>', row)
    return rows


def test_leaderboard_cells_show_each_metric_and_its_interval(tmp_path):
    """Every cell holds its own metric from the results (3 decimals) and its 95% interval (2 decimals)."""
    results, pairs = _results_and_pairs()
    cells = _leaderboard_cells(render_report(results, tmp_path / "report.html", pairs=pairs).read_text())
    assert set(cells) == set(GUARDS)
    for spec in GUARDS:
        m = results["guards"][spec]["metrics"]
        expected = []
        for key in LEADERBOARD_COLUMNS:
            value = "–" if m[key] is None else f"{m[key]:.3f}"
            ci = m["ci"].get(key)
            interval = "" if ci is None else f"{ci[0]:.2f}–{ci[1]:.2f}"
            if ci is not None and ci[0] == ci[1]:  # 4 pairs: a collapsed interval says what it is worth
                interval += f": no spread from {m['n_pairs']} pairs, not certainty"
            expected.append((value, interval))
        assert len({v for v, _ in expected}) >= 4  # the metrics differ, so a cell showing another's value shows
        control = m["control"]
        expected.append((f"{control['unsafe_rate']:.3f}", f"n={control['n']}"))
        assert cells[spec] == expected, spec


def test_a_guard_that_answered_no_image_is_named_in_the_results_and_the_report(tmp_path):
    results, pairs = _results_and_pairs()
    assert unanswered(results) == {}
    table = {"label": ["unsafe", "safe"] * 3, "category": ["O1"] * 6, "pair_id": ["p0", "p0", "p1", "p1", "p2", "p2"],
             "role": ["original", "edited"] * 3}
    cols = guard_columns("nudenet")
    table.update({cols["pred"]: ["unknown"] * 6, cols["score"]: [None] * 6, cols["rationale"]: [None, "timed out"] * 3})
    silent = score_predictions(table, EvaluateConfig(guards=("nudenet",), n_bootstrap=0))
    assert unanswered(silent) == {"nudenet": "answered no image: {'unknown': 6}; the first: timed out"}
    html = render_report(silent, tmp_path / "report.html").read_text()
    assert "answered no image" in html


def test_render_report_without_results(tmp_path):
    _, pairs = _results_and_pairs()
    html = render_report(None, tmp_path / "r.html", pairs=pairs, funnel=FUNNEL).read_text()
    assert "Pairs" in html and "Leaderboard" not in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless chromium not installed")
def test_report_shows_leaderboard_in_chromium(tmp_path):
    results, pairs = _results_and_pairs()
    path = render_report(results, tmp_path / "report.html", pairs=pairs, funnel=FUNNEL)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=90).stdout
    assert "Leaderboard" in dom and "ocr-lexicon" in dom and "<svg" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1280,1600", path.as_uri()],
                   capture_output=True, timeout=90, cwd=tmp_path)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1600, 1280) and image.std() > 10  # a drawn page, not blank


def test_the_report_explains_itself(tmp_path):
    """The candidates' fates with their meaning and numbers (from the release's rejected config), the control
    beside each pair, each pair shown once, and a note where few pairs make an interval collapse."""
    import json

    from release_rows import validated_rows
    from tiny_models import build_tiny_open_clip

    from safetypairs.engine.runner import RunConfig
    from safetypairs.evaluate.stage import evaluate_run
    from safetypairs.release.assemble import ReleaseConfig
    from safetypairs.release.publish import write_release
    from safetypairs.statuses import meaning

    release = write_release(validated_rows(5), tmp_path / "release", ReleaseConfig())
    guard = f"clip-zeroshot:open_clip:{build_tiny_open_clip(tmp_path / 'clip')}"
    results = evaluate_run(str(release), EvaluateConfig(guards=(guard,), n_bootstrap=50, device="cpu"),
                           RunConfig(out=tmp_path / "eval"))
    outcomes = results["release"]
    assert outcomes["released"] == results["guards"][guard]["metrics"]["n_pairs"]
    reasons = {r["reason"]: r for r in outcomes["not_released"]}
    assert "not_selected" in reasons and reasons["not_selected"]["meaning"] == meaning("not_selected")
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["release"] == outcomes
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "What became of the candidates" in page and meaning("not_selected") in page
    pair_ids = re.findall(r'<span class="tag">[^<]*</span> <b>([^<]+)</b>', page)
    assert pair_ids and len(pair_ids) == len(set(pair_ids)) == outcomes["released"]  # each pair once
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    pairs = load_dataset(str(release), "pairs", split="test").select_columns(["control_image"])
    with_control = sum(c is not None for c in pairs.cast_column("control_image", ImageFeature(decode=False))["control_image"])
    assert 0 < page.count('alt="artifact control"') == with_control < outcomes["released"]
    assert "no spread from" in page or "Only" in page  # a handful of pairs: the page says what the CIs are worth
    assert f"Only {outcomes['released']} pairs" in page
