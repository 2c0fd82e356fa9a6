"""Served models against a real OpenAI-compatible server: `transformers serve` on a tiny local VLM (no network), with
a proxy in front that injects 429s, 500s, hangs and dropped connections and counts every request."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("openai")

from served_server import FaultProxy, served  # noqa: E402

from safetypairs import statuses as ST  # noqa: E402
from safetypairs.backends.registry import build_backend  # noqa: E402
from safetypairs.policy import load_policy  # noqa: E402
from safetypairs.sources import DEMO_PHOTOS, demo_photo  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import build_tiny_answering_vlm

    return build_tiny_answering_vlm(tmp_path_factory.mktemp("served") / "tiny-guard")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with served(model, tmp_path_factory.mktemp("serve-log") / "serve.log") as url:
        yield url


def _guard(model, url, **options):
    text = ",".join(f"{k}={v}" for k, v in {"base_url": url, "cache": "off", **options}.items())
    return build_backend("guards", f"openai:{model},{text}")


def _images(n):
    return [demo_photo(DEMO_PHOTOS[i]).resize((48, 40)) for i in range(n)]


def test_a_served_guard_answers_like_a_guard(model, server):
    guard = _guard(model, server)
    verdicts = guard.classify(_images(3), ["O1"] * 3, load_policy("llavaguard"))
    assert [v.label for v in verdicts] and all(v.label in ("safe", "unsafe") for v in verdicts)
    assert all(v.status is None and json.loads(v.raw)["score_from"] == "text" for v in verdicts)  # no logprobs
    assert guard.usage.answers == 3 and guard.usage.scored_by_text == 3 and guard.usage.failures == 0
    assert guard.usage.as_dict()["latency_p50_s"] is not None


def test_the_instructor_and_the_judge_go_through_the_same_server(model, server):
    from safetypairs.edit import EditConfig, run_edit
    from safetypairs.instruct import InstructConfig, run_instruct
    from safetypairs.sources import build_demo_source
    from safetypairs.validate.stage import validate_pairs

    spec = f"openai:{model},base_url={server},cache=off"
    rows, result = run_instruct(build_demo_source(2), InstructConfig(instructor=spec))
    assert set(result.statuses) == {ST.UNPARSABLE}  # the tiny guard answers "unsafe ...", not the JSON asked for
    assert all("unsafe" in raw for raw in rows["instruct_raw"])  # the server's own answer, kept
    rows, _ = run_instruct(build_demo_source(2), InstructConfig(instructor="template"))
    rows, _ = run_edit(rows, EditConfig(editor="ocr-inpaint"))
    validated = validate_pairs(rows, judge=spec, judge_all_rows=True)
    assert all(validated["label_flip_checked"]) and set(validated["judge_original"]) <= {"safe", "unsafe"}


def test_faults_are_retried_and_nothing_is_lost(model, server):
    proxy = FaultProxy(server, ["429", "500", "hang", "drop"], hang_s=4)
    try:
        guard = _guard(model, proxy.url, timeout=2, max_retries=6, max_concurrency=1)
        verdicts = guard.classify(_images(4), [None] * 4, load_policy("llavaguard"))
        assert all(v.status is None and v.label in ("safe", "unsafe") for v in verdicts)
        usage = guard.usage.as_dict()
        assert proxy.requests == 4 + 4 == usage["requests"] and usage["retries"] == 4 and usage["answers"] == 4
    finally:
        proxy.close()


def test_a_request_that_keeps_failing_is_that_rows_api_error_and_the_run_goes_on(model, server):
    from datasets import Dataset

    from safetypairs.evaluate.stage import EvaluateConfig, run_evaluate

    proxy = FaultProxy(server, ["fail"])
    try:
        spec = f"openai:{model},base_url={proxy.url},cache=off,max_retries=1,timeout=5"
        rows = Dataset.from_dict({"image": _images(2), "label": [1, 0], "category": ["O1"] * 2,
                                  "pair_id": ["p", "p"], "role": ["original", "edited"]})
        results = run_evaluate(rows, EvaluateConfig(guards=(spec,), n_bootstrap=0, device="cpu"))
        preds = results["predictions"][spec]
        assert results["guards"][spec]["statuses"] == {ST.API_ERROR: 2} and preds["pred"] == ["unknown"] * 2
        assert "injected fail" in preds["rationale"][0] and proxy.requests == 2 * (1 + 1)  # 1 try + 1 retry each
    finally:
        proxy.close()


def test_the_cache_answers_a_rerun_and_a_changed_setting_misses(model, server, tmp_path):
    proxy = FaultProxy(server)
    try:
        cache = tmp_path / "answers.sqlite"
        policy, images = load_policy("llavaguard"), _images(3)
        first = _guard(model, proxy.url, cache=cache).classify(images, [None] * 3, policy)
        assert proxy.requests == 3
        again = _guard(model, proxy.url, cache=cache)
        assert [v.label for v in again.classify(images, [None] * 3, policy)] == [v.label for v in first]
        assert proxy.requests == 3 and again.usage.cache_hits == 3  # a new process-like instance: nothing asked
        _guard(model, proxy.url, cache=cache, max_tokens=4).classify(images, [None] * 3, policy)
        _guard(model, proxy.url, cache=cache, prompt="llavaguard").classify(images, [None] * 3, policy)
        assert proxy.requests == 3 + 3 + 3  # another setting, another prompt: new requests
    finally:
        proxy.close()


def test_readiness_names_what_is_wrong_before_any_row(model, server, monkeypatch):
    from safetypairs.backends.registry import check_options, check_ready
    from safetypairs.backends.served import preflight

    preflight.cache_clear()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ValueError, match="cannot reach http://127.0.0.1:.* start the server or fix base_url"):
        check_ready("guards", f"openai:{model},base_url={dead},timeout=3")
    with pytest.raises(ValueError, match=f"does not serve 'no-such-model'; it serves: {model}"):
        check_ready("guards", f"openai:no-such-model,base_url={server}")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"the OpenAI API needs a key: set \$OPENAI_API_KEY"):
        check_ready("guards", "openai:gpt-4o")
    check_ready("guards", f"openai:{model},base_url={server}")  # a local server needs no key
    check_options("guards", f"openai:{model},base_url={dead}")  # the spec check itself never touches the network


def test_p_unsafe_from_a_recorded_openai_response_with_logprobs():
    """The logprob path, on a response in the OpenAI API's documented format (transformers serve sends none)."""
    import math

    from openai.types.chat import ChatCompletion

    from safetypairs.backends.served import _answer, verdict_score

    def token(text, alternatives):
        return {"token": text, "logprob": math.log(alternatives[0][1]), "bytes": None,
                "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in alternatives]}

    one_word = ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "unsafe"},
                     "logprobs": {"content": [token("unsafe", [("unsafe", 0.6), ("Unsafe", 0.1), ("safe", 0.25),
                                                                ("I", 0.05)])]}}],
        "usage": {"prompt_tokens": 900, "completion_tokens": 1, "total_tokens": 901}})
    answer = _answer(one_word)
    assert answer["usage"] == {"prompt_tokens": 900, "completion_tokens": 1}
    assert verdict_score(answer["logprobs"], "hf-vlm") == pytest.approx(0.7 / 0.95)
    llavaguard = ChatCompletion.model_validate({
        "id": "y", "object": "chat.completion", "created": 0, "model": "llavaguard",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": '{"rating": "Safe", "category": "NA"}'},
                     "logprobs": {"content": [token('{"', [('{"', 0.99)]), token("rating", [("rating", 0.99)]),
                                              token('":', [('":', 0.99)]), token(' "', [(' "', 0.99)]),
                                              token("Safe", [("Safe", 0.8), ("Unsafe", 0.2)]),
                                              token('",', [('",', 0.99)])]}}]})
    assert verdict_score(_answer(llavaguard)["logprobs"], "llavaguard") == pytest.approx(0.2)
    assert verdict_score(None, "hf-vlm") is None


def test_the_key_never_appears_in_any_output_and_a_killed_run_never_pays_twice(model, server, tmp_path):
    """evaluate through the CLI with a key in the environment: killed after its first answers, run again; every
    file written and everything printed is searched for the key, and no answer was asked for twice."""
    from release_rows import validated_rows

    from safetypairs.release.assemble import ReleaseConfig
    from safetypairs.release.publish import write_release

    secret = "sk-test-0123456789-do-not-leak"
    release = write_release(validated_rows(6), tmp_path / "release", ReleaseConfig())
    proxy = FaultProxy(server)
    cache = tmp_path / "answers.sqlite"
    spec = f"openai:{model},base_url={proxy.url},api_key_env=MY_TEST_KEY,cache={cache},max_concurrency=1"
    cmd = [sys.executable, "-m", "safetypairs", "evaluate", "--dataset", str(release), "--guard", spec,
           "--out", str(tmp_path / "eval"), "--chunk-size", "4", "--bootstrap", "20", "--device", "cpu"]
    env = {**os.environ, "MY_TEST_KEY": secret, "SAFETYPAIRS_NO_PROGRESS": "1"}
    try:
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        deadline = time.monotonic() + 120
        while proxy.requests < 5 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        out1, err1 = first.communicate()
        seen = proxy.requests
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert 0 < seen < proxy.requests
        # nothing answered is asked again; only the one request in flight at the kill (max_concurrency=1) may be
        twice = [b for i, b in enumerate(proxy.bodies) if b in proxy.bodies[:i]]
        assert twice in ([], [proxy.bodies[seen - 1]]), (seen, twice)
        written = [p for p in tmp_path.rglob("*") if p.is_file()]
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaks and secret not in out1 + err1 + done.stdout + done.stderr
    finally:
        proxy.close()


def test_usage_in_run_json_results_and_report_equals_what_the_proxy_counted(model, server, tmp_path):
    """evaluate over a release through a faulty proxy, in chunks: the counts summed over the chunks' markers into
    run.json, results.json (per guard) and the report equal the requests the proxy saw and the answers it sent."""
    from release_rows import validated_rows

    from safetypairs.engine.runner import RunConfig
    from safetypairs.evaluate.stage import EvaluateConfig, evaluate_run
    from safetypairs.release.assemble import ReleaseConfig
    from safetypairs.release.publish import write_release

    release = write_release(validated_rows(4), tmp_path / "release", ReleaseConfig())
    proxy = FaultProxy(server, ["429", "500"])
    try:
        spec = f"openai:{model},base_url={proxy.url},cache={tmp_path / 'answers.sqlite'},max_concurrency=2"
        config = EvaluateConfig(guards=(spec,), n_bootstrap=0, device="cpu")
        results = evaluate_run(str(release), config, RunConfig(tmp_path / "eval", chunk_size=3))
        run = json.loads((tmp_path / "eval" / "run.json").read_text())
        usage = run["usage"]["guards"][spec]
        n = results["n_images"]
        assert usage["requests"] == proxy.requests == n + 2 and usage["retries"] == 2 and usage["answers"] == n
        assert usage["cache_hits"] == 0 and usage["scored_by_text"] == n and usage["score_from"] == "text"
        assert sum(usage["latency_buckets"]) == n and usage["latency_p50_s"] <= usage["latency_p99_s"]
        assert usage["prompt_tokens"] > 0 and results["guards"][spec]["usage"] == usage
        assert run["guard_order"] == "chunk"
        report = (tmp_path / "eval" / "report.html").read_text()
        assert f"served: {n + 2} requests (2 retries, 0 failed)" in report and "the text verdict" in report
        again = evaluate_run(str(release), config, RunConfig(tmp_path / "again", chunk_size=3))  # all from the cache
        cached = again["guards"][spec]["usage"]
        assert proxy.requests == n + 2 and cached["cache_hits"] == n and cached["requests"] == 0
    finally:
        proxy.close()
