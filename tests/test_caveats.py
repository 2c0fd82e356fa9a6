"""Caveats results carry: guards sharing the judge's backend, pairs no judge checked."""

from safetypairs import schema as S
from safetypairs.evaluate.caveats import circularity_notes, release_caveats, shares_backend
from safetypairs.evaluate.report import render_report


def test_a_guard_sharing_the_judges_backend_or_model_is_flagged():
    assert shares_backend("ocr-lexicon", "ocr-lexicon:box_thresh=0.3,unclip_ratio=2.0")
    assert shares_backend("llavaguard:org/model,scope=category", "hf-vlm:org/model")  # same model, two aliases
    assert not shares_backend("nudenet", "ocr-lexicon")
    assert not shares_backend("hf-vlm:org/a", "hf-vlm:org/b")  # two models on the same runtime
    notes = circularity_notes(["ocr-lexicon", "nudenet"], ["ocr-lexicon:mode=rec", None, ""])
    assert list(notes) == ["ocr-lexicon"] and "ocr-lexicon:mode=rec" in notes["ocr-lexicon"]


def test_pairs_no_judge_checked_are_said_in_results_and_report(tmp_path):
    pairs = {S.JUDGE: [None, "ocr-lexicon", None], S.LABEL_FLIP_CHECKED: [False, True, None]}
    notes, warnings = release_caveats(pairs, ["ocr-lexicon"])
    assert "ocr-lexicon" in notes and len(warnings) == 1 and "2 of 3 pairs" in warnings[0]
    assert release_caveats({S.JUDGE: ["j"], S.LABEL_FLIP_CHECKED: [True]}, ["nudenet"]) == ({}, [])
    html = render_report({"warnings": warnings}, tmp_path / "report.html").read_text()
    assert "No judge checked that the edits flip the label" in html
