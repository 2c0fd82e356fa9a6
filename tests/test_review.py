"""Review app, decisions store, agreement and review-gated release, through gradio_client and a real browser."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from sklearn.metrics import cohen_kappa_score

from safetypairs import schema as S
from safetypairs.cli import build_parser, main
from safetypairs.engine.datafiles import read_rows
from safetypairs.release.assemble import ReleaseConfig, assemble
from safetypairs.review.store import (
    DECISIONS_FILE,
    agreement,
    append_decision,
    candidate_ids,
    candidate_stamps,
    load_review,
    make_decision,
    read_decisions,
)
from safetypairs.engine.runner import RunConfig
from safetypairs.validate.stage import ValidateConfig, validate_run
from tests.release_rows import validated_rows

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from safetypairs.review.app import ReviewConfig, ReviewSource, in_scope, listen, review_server  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return validated_rows(n_sources=6, candidates=2)  # 12 candidates, 8 accepted automatically


@pytest.fixture
def folder(rows, tmp_path):
    rows.save_to_disk(str(tmp_path / "validated"))
    return tmp_path / "validated"


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _join(thread: threading.Thread, timeout: float, errors: list[BaseException]) -> None:
    """Join ``thread``; fail the test when it is still running or raised (a thread's exception is only printed)."""
    thread.join(timeout=timeout)
    assert not thread.is_alive(), f"{thread.name} still running after {timeout} s"
    if errors:
        raise errors[0]


def _thread(target, *args) -> tuple[threading.Thread, list[BaseException]]:
    """A daemon thread running ``target(*args)`` that records what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test by _join
            errors.append(err)

    return threading.Thread(target=run, daemon=True), errors


@contextmanager
def serving(folder: Path, reviewer: str, scope: str = "all"):
    """The review app in a thread of this process: the server `safetypairs review` runs, on a port it binds itself
    (port 0, read back from the bound socket, so no other process can take it in between)."""
    config = ReviewConfig(reviewer, scope=scope, port=0)
    server, sock = review_server(folder, config), listen(config)
    thread, errors = _thread(server.run, [sock])
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    try:
        _wait_http(url)
        yield url
    finally:
        server.should_exit = True
        _join(thread, 10, errors)
        sock.close()


def _latest(folder: Path) -> dict[tuple[str, str], dict]:
    return {(r["reviewer"], r["candidate_id"]): r for r in read_decisions(folder)}


def test_decisions_land_in_review_jsonl_and_a_restart_resumes(folder, rows):
    ids = candidate_ids(rows)
    with serving(folder, "alice") as url:
        client = Client(url, verbose=False)
        first = client.predict(api_name="/current")
        assert first[2] == ids[0] and "0 done / 12 left" in first[3]
        assert "/review-image/0/original" in first[0]
        after_accept = client.predict(None, "", api_name="/accept")
        assert after_accept[2] == ids[1]
        after_reject = client.predict("not_local", "halo around the box", api_name="/reject")
        assert after_reject[2] == ids[2] and "2 done / 10 left" in after_reject[3]
        with pytest.raises(Exception):  # a rejection without a reason is refused, nothing is written
            client.predict(None, "", api_name="/reject")
        back = client.predict(api_name="/back")  # change the decision on ids[1]: the history stays
        assert back[2] == ids[1] and "reject" in back[1]
        client.predict(None, "", api_name="/accept")
    records = read_decisions(folder)
    assert [(r["candidate_id"], r["decision"], r["reason"]) for r in records] == [
        (ids[0], "accept", None), (ids[1], "reject", "not_local"), (ids[1], "accept", None)]
    assert records[1]["note"] == "halo around the box" and records[0]["reviewer"] == "alice"
    assert all(r["time"].endswith("+00:00") and r["app_version"].startswith("safetypairs-review/") for r in records)
    assert _latest(folder)[("alice", ids[1])]["decision"] == "accept"
    with serving(folder, "alice") as url:  # a new server on the same folder resumes after the decided ones
        resumed = Client(url, verbose=False).predict(api_name="/current")
    assert resumed[2] == ids[2] and "2 done / 10 left" in resumed[3]


def test_two_reviewers_at_once_lose_nothing(tmp_path):
    rows, folder = validated_rows(n_sources=3, candidates=2), tmp_path / "small"
    rows.save_to_disk(str(folder))
    ids = candidate_ids(rows)
    results: dict[str, list[str]] = {}

    def review_all(url: str, name: str) -> None:
        client = Client(url, verbose=False)
        seen = [client.predict(api_name="/current")[2]]
        for i in range(len(ids)):
            out = client.predict(None, "", api_name="/accept") if i % 2 else \
                client.predict("artifact", "", api_name="/reject")
            seen.append(out[2])
        results[name] = seen

    with serving(folder, "alice") as url_a, serving(folder, "bob") as url_b:  # two servers, one file
        threads = [_thread(review_all, u, n) for u, n in ((url_a, "alice"), (url_b, "bob"))]
        for t, _ in threads:
            t.start()
        for t, errors in threads:
            _join(t, 120, errors)
    records = read_decisions(folder)
    assert len(records) == 2 * len(ids)
    assert len((folder / DECISIONS_FILE).read_text().splitlines()) == 2 * len(ids)
    for name in ("alice", "bob"):
        mine = [r for r in records if r["reviewer"] == name]
        assert [r["candidate_id"] for r in mine] == ids
        assert results[name][:len(ids)] == ids and results[name][-1] == ""  # then nothing left
        assert [r["decision"] for r in mine] == ["reject", "accept"] * (len(ids) // 2)


def test_the_port_is_held_from_the_moment_it_is_chosen():
    """Port 0 binds a free port that is read back from the socket; nobody else can bind it while the app holds it."""
    with listen(ReviewConfig("alice", port=0)) as sock:
        port = sock.getsockname()[1]
        assert port > 0
        with pytest.raises(OSError):
            listen(ReviewConfig("bob", port=port))


def test_safetypairs_review_on_port_0_prints_the_port_it_serves(folder):
    """The command binds a free port itself and prints the URL it actually serves, which answers."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.Popen([sys.executable, "-m", "safetypairs", "-q", "review", str(folder), "--reviewer", "eve",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": src})
    try:
        line = proc.stdout.readline()  # printed once the port is bound ("" if the command exited)
        if " on http://" not in line:
            proc.kill()
            pytest.fail(f"no URL printed: {line!r}\n{proc.communicate()[1][-3000:]}")
        url = line.split(" on ", 1)[1].split()[0]
        assert not url.endswith(":0/"), line
        _wait_http(url)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_review_command_line():
    args = build_parser().parse_args(["review", "runs/v", "--reviewer", "alice", "--only", "borderline", "--port", "0"])
    assert (args.reviewer, args.only, args.port, args.host) == ("alice", "borderline", 0, "127.0.0.1")
    assert main(["review", "/nonexistent", "--reviewer", "alice"]) == 2  # one-line error, no server
    with pytest.raises(ValueError, match="reviewer"):
        ReviewConfig(" ")


def _append_many(folder: str, worker: int) -> None:
    for i in range(150):
        append_decision(folder, make_decision(f"w{worker}", f"c{i}", "reject", "other", "x" * 5000))


def test_append_is_atomic_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4  # a writer that died or hung fails here, not as a line count
    lines = (tmp_path / DECISIONS_FILE).read_text().splitlines()
    assert len(lines) == 600 and all(json.loads(line)["note"] == "x" * 5000 for line in lines)
    with open(tmp_path / DECISIONS_FILE, "a") as f:  # a writer killed mid-line: skipped with a warning
        f.write('{"reviewer": "torn", "candid')
    assert len(read_decisions(tmp_path)) == 600


def test_make_decision_checks_its_values():
    with pytest.raises(ValueError, match="reason"):
        make_decision("alice", "c", "reject")
    with pytest.raises(ValueError, match="decision must be one of"):
        make_decision("alice", "c", "maybe")
    with pytest.raises(ValueError, match="note"):
        make_decision("alice", "c", "reject", "other")
    with pytest.raises(ValueError, match="reviewer"):
        make_decision(" ", "c", "accept")
    assert make_decision("alice", "c", "accept", "artifact")["reason"] is None


def _decide(folder: Path, ids: list[str], reviewer: str, votes: str, reason: str = "not_local") -> None:
    """One decision per character: a accept, r reject, . none."""
    for cid, vote in zip(ids, votes):
        if vote != ".":
            append_decision(folder, make_decision(reviewer, cid, "accept" if vote == "a" else "reject",
                                                  None if vote == "a" else reason))


def test_kappa_equals_sklearn(folder, rows):
    ids = candidate_ids(rows)
    _decide(folder, ids, "alice", "aarraarraaar")
    _decide(folder, ids, "bob", "rarraaaraa..", reason="artifact")
    _decide(folder, ids[:2], "bob", "ar")  # bob changes his mind on the first two: his last decision counts
    stats = agreement(rows, read_decisions(folder))
    alice = [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    bob = [1, 0, 0, 0, 1, 1, 1, 0, 1, 1]
    (pair,) = stats["between_reviewers"]
    assert pair["reviewers"] == ["alice", "bob"] and pair["n"] == 10
    assert pair["kappa"] == pytest.approx(cohen_kappa_score(alice[:10], bob))
    auto = [int(a) for a in rows[S.ACCEPTED]]
    assert stats["vs_automatic"]["alice"]["kappa"] == pytest.approx(cohen_kappa_score(alice, auto))
    judge = [int(o == "unsafe" and e == "safe") for o, e in zip(rows[S.JUDGE_ORIGINAL], rows[S.JUDGE_EDITED])]
    assert stats["vs_judge"]["bob"]["kappa"] == pytest.approx(cohen_kappa_score(bob, judge[:10]))
    assert stats["reviewers"]["bob"] == {"accept": 6, "reject": 4}
    assert stats["reasons"] == {"not_local": 5 + 1, "artifact": 3}
    assert stats["records"] == 12 + 10 + 2 and stats["superseded"] == 2
    assert main(["review-stats", str(folder)]) == 0
    assert json.loads((folder / "review_stats.json").read_text()) == json.loads(json.dumps(stats))
    assert not (folder / "results.json").exists()  # evaluate's file name, left alone


def test_a_judge_that_answered_unknown_is_left_out_of_kappa_vs_judge(rows):
    """The judge's unknown is no verdict: those candidates leave the comparison; it is not a rejection."""
    ids = candidate_ids(rows)
    originals = ["unknown" if i in (0, 4) else "unsafe" for i in range(len(ids))]
    edits = ["unknown" if i == 6 else e for i, e in enumerate(rows[S.JUDGE_EDITED])]
    judged = rows.remove_columns([S.JUDGE_ORIGINAL, S.JUDGE_EDITED]).add_column(S.JUDGE_ORIGINAL, originals) \
        .add_column(S.JUDGE_EDITED, edits)
    votes = "aarraaarraaa"  # the reviewer accepts 0, 4 and 6: a judge unknown read as reject would disagree
    stats = agreement(judged, [make_decision("alice", cid, "accept" if v == "a" else "reject",
                                             None if v == "a" else "artifact") for cid, v in zip(ids, votes)])
    known = [i for i in range(len(ids)) if i not in (0, 4, 6)]
    alice = [int(votes[i] == "a") for i in known]
    judge = [int(originals[i] == "unsafe" and edits[i] == "safe") for i in known]
    vs_judge = stats["vs_judge"]["alice"]
    assert vs_judge["n"] == 9 and vs_judge["agreement"] == pytest.approx(sum(a == j for a, j in zip(alice, judge)) / 9)
    assert vs_judge["kappa"] == pytest.approx(cohen_kappa_score(alice, judge))
    assert stats["vs_automatic"]["alice"]["n"] == 12  # the automatic decision is known for every candidate


def test_three_reviewers_two_accept_one_reject_is_a_majority(folder, rows, tmp_path):
    """Strict majority, not unanimity: with three reviewers, 2 accept + 1 reject verifies a pair."""
    from safetypairs.review.store import majority

    votes = {name: make_decision(name, "c", d, None if d == "accept" else "artifact")
             for name, d in (("alice", "accept"), ("bob", "accept"), ("carol", "reject"))}
    assert majority(votes, min_reviewers=3).human_verified
    assert not majority({k: votes[k] for k in ("alice", "carol")}, min_reviewers=2).human_verified  # 1:1 tie
    ids = candidate_ids(rows)
    accepted = [cid for cid, ok in zip(ids, rows[S.ACCEPTED]) if ok]
    _decide(folder, accepted[:3], "alice", "aar")
    _decide(folder, accepted[:3], "bob", "arr")
    _decide(folder, accepted[:3], "carol", "rrr", reason="still_unsafe")
    review = load_review(folder, rows, min_reviewers=3)
    first, second, third = (review.majorities[c] for c in accepted[:3])
    assert first.human_verified and first.n_reviewers == 3 and first.reason is None
    assert not second.human_verified and second.detail == "2 of 3 reviewers reject"
    assert not third.human_verified and third.reason == "human_rejected:not_local"  # 2 of the 3 reasons
    release = assemble(rows, ReleaseConfig(), review)
    rejected = release["rejected"]["test"]
    reasons = dict(zip((f"{s}#{c}" for s, c in zip(rejected[S.SOURCE_ID], rejected[S.CANDIDATE])),
                       rejected[S.REJECT_REASON]))
    assert accepted[0] not in reasons and accepted[0].split("#")[0] in release["pairs"]["test"][S.SOURCE_ID]
    assert reasons[accepted[1]] == "human_rejected:not_local"  # bob's and carol's reasons tie: alphabetical
    assert reasons[accepted[2]] == "human_rejected:not_local"


def test_release_keeps_only_pairs_reviewers_accepted(folder, rows, tmp_path):
    ids = candidate_ids(rows)
    accepted = [cid for cid, ok in zip(ids, rows[S.ACCEPTED]) if ok]
    # two reviewers; the first accepted candidate is rejected by both, the second split 1:1, the rest accepted
    _decide(folder, accepted, "alice", "ra" + "a" * (len(accepted) - 2))
    _decide(folder, accepted, "bob", "rr" + "a" * (len(accepted) - 3) + ".", reason="still_unsafe")
    release = assemble(rows, ReleaseConfig(), load_review(folder, rows, min_reviewers=2))
    pairs, rejected = release["pairs"]["test"], release["rejected"]["test"]
    assert all(pairs[S.HUMAN_VERIFIED]) and set(pairs[S.N_REVIEWERS]) == {2}
    reasons = dict(zip((f"{s}#{c}" for s, c in zip(rejected[S.SOURCE_ID], rejected[S.CANDIDATE])),
                       rejected[S.REJECT_REASON]))
    assert reasons[accepted[0]] == "human_rejected:not_local"  # tie of reasons: alphabetical
    assert reasons[accepted[1]] == "human_rejected:no_majority"
    assert reasons[accepted[-1]] == "not_reviewed"
    details = dict(zip((f"{s}#{c}" for s, c in zip(rejected[S.SOURCE_ID], rejected[S.CANDIDATE])),
                       rejected[S.REJECT_DETAIL]))
    assert details[accepted[-1]] == "1 of 2 reviewers decided" and details[accepted[1]] == "1 of 2 reviewers reject"
    assert release.review["min_reviewers"] == 2
    unreviewed = assemble(rows)["pairs"]["test"]
    assert not any(unreviewed[S.HUMAN_VERIFIED]) and set(unreviewed[S.N_REVIEWERS]) == {0}
    out = tmp_path / "release"
    assert main(["release", str(folder), "--out", str(out), "--require-review", "--min-reviewers", "2"]) == 0
    card = (out / "README.md").read_text()
    assert "### Human review" in card and "at least 2 reviewer(s)" in card and "| alice |" in card
    assert main(["release", str(folder), "--out", str(tmp_path / "x"), "--min-reviewers", "2"]) == 2


def test_scopes_and_run_folder_input(rows, tmp_path):
    meta = rows.remove_columns([c for c in rows.column_names if "image" in c or c == S.EDIT_MASK]).to_list()
    assert sum(in_scope(r, "accepted") for r in meta) + sum(in_scope(r, "rejected") for r in meta) == len(meta)
    pixel_exact = json.dumps({"min_ssim_outside": 0.91})
    assert in_scope({S.SSIM_OUTSIDE: 0.92, S.VALIDATE_LIMITS: pixel_exact}, "borderline")
    assert not in_scope({S.SSIM_OUTSIDE: 0.99, S.VALIDATE_LIMITS: pixel_exact}, "borderline")
    # the limits the row was decided with count (a thresholds file, an override), not a preset guessed from a label
    strict = json.dumps({"min_ssim_outside": 0.98})
    assert in_scope({S.SSIM_OUTSIDE: 0.99, S.VALIDATE_THRESHOLDS: "pixel-exact+overrides", S.VALIDATE_LIMITS: strict},
                    "borderline")
    assert in_scope({S.REJECT_REASON: "judge_unknown"}, "borderline")
    with pytest.raises(ValueError, match="scope must be one of"):
        in_scope({}, "some")
    run = tmp_path / "run"  # the runner's layout: run.json + data/train-*.parquet
    (run / "data").mkdir(parents=True)
    rows.to_parquet(str(run / "data" / "train-00000-of-00001.parquet"))
    (run / "run.json").write_text("{}")
    source = ReviewSource(run, ReviewConfig("carol", scope="accepted"))
    assert len(source.pending()) == sum(rows[S.ACCEPTED])
    data, media = source.image(0, "original")
    assert media == "image/png" and data[:4] == b"\x89PNG"
    assert source.image(0, "nope") is None and source.image(99, "edit") is None


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="Debian chromium and chromium-driver are not installed")
def test_in_a_real_browser_the_accept_key_records_a_decision(folder, rows, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(flag)
    ids = candidate_ids(rows)
    _decide(folder, ids[:2], "dave", "ar")  # the app resumes at the third candidate (which has a control)
    with serving(folder, "dave", scope="accepted") as url:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 30)
            loaded = "return [...document.querySelectorAll('#sp-pair .sp-grid img')]" \
                     ".filter(i => i.complete && i.naturalWidth > 0).length"
            wait.until(lambda d: d.execute_script(loaded) == 4)  # original, edit, control, edit under the mask
            for button in ("sp-accept", "sp-reject", "sp-skip", "sp-back"):
                assert driver.find_element(By.ID, button).is_displayed()
            field = "return document.querySelector('#sp-candidate textarea, #sp-candidate input').value"
            first = driver.execute_script(field)
            assert first == ids[2]
            shot = Path(os.environ.get("SAFETYPAIRS_ARTIFACTS", tmp_path)) / "review_app.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(shot))
            driver.find_element(By.TAG_NAME, "body").send_keys("a")
            wait.until(lambda d: d.execute_script(field) not in ("", first))
        finally:
            driver.quit()
    assert shot.stat().st_size > 10_000
    assert _latest(folder)[("dave", first)]["decision"] == "accept"


def _brighter(row: dict) -> dict:
    """Candidate 1 of each source also brightens the whole photo a little (an edit that is not local)."""
    if row[S.CANDIDATE] == 1:
        row[S.EDITED_IMAGE] = row[S.EDITED_IMAGE].point(lambda v: min(255, v + 6))
    return row


def test_validate_overwrite_keeps_decisions_and_stale_ones_do_not_count(rows, tmp_path, caplog):
    rows = rows.map(_brighter)
    out = tmp_path / "validated"
    validate_run(rows, ValidateConfig(device="cpu"), RunConfig(out))
    first = read_rows(out)
    ids, stamps = candidate_ids(first), candidate_stamps(first)
    for cid, stamp in zip(ids, stamps):
        append_decision(out, make_decision("alice", cid, "accept", content=stamp))
    append_decision(out, make_decision("bob", ids[1], "accept"))  # no stamp (an older app): never stale
    before = (out / DECISIONS_FILE).read_bytes()
    # other thresholds: same images, so every decision still counts
    validate_run(rows, ValidateConfig(device="cpu", max_changed_fraction=0.9), RunConfig(out, overwrite=True))
    assert (out / DECISIONS_FILE).read_bytes() == before
    assert f"kept {DECISIONS_FILE}" in caplog.text
    again = read_rows(out)
    assert candidate_stamps(again) == stamps
    review = load_review(out, again)
    assert review.summary["stale_decisions"] == 0 and all(v.human_verified for v in review.majorities.values())
    # --composite pastes the edits back onto the originals: decisions on the old edits are stale
    caplog.clear()
    validate_run(rows, ValidateConfig(device="cpu", composite=True), RunConfig(out, overwrite=True))
    assert (out / DECISIONS_FILE).read_bytes() == before
    composited = read_rows(out)
    changed = [cid for cid, old, new in zip(ids, stamps, candidate_stamps(composited)) if old != new]
    assert changed == [cid for cid in ids if cid.endswith("#1")]  # composite took the brightening back
    review = load_review(out, composited)
    assert review.summary["stale_decisions"] == len(changed)
    assert "not counted: review those candidates again" in caplog.text
    assert [cid for cid, v in review.majorities.items() if not v.human_verified] == changed[1:]
    assert changed[0] == ids[1] and review.majorities[ids[1]].n_reviewers == 1  # bob's unstamped decision counts
    assert review.majorities[ids[0]] == review.majorities[ids[1]]  # alice on unchanged images counts
    source = ReviewSource(out, ReviewConfig("alice", scope="all"))  # the app asks alice for the changed ones again
    assert [source.ids[i] for i in source.pending()] == changed
