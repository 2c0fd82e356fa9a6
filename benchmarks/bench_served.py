"""Benchmark served guards (``openai:<model>``) against a local ``transformers serve`` of a tiny VLM.

    OMP_NUM_THREADS=1 python benchmarks/bench_served.py [--n 32] [--rounds 3]

1. Concurrency: the same images classified with 8 requests in flight vs one at a time (cache off), interleaved
   rounds; the throughput ratio is the median of the per-round ratios (sequential seconds / concurrent seconds).
   It measures the server as much as the client: a server that answers one request at a time (``transformers
   serve`` without continuous batching, on a shared CPU) leaves little to gain.
2. Rerun: ``safetypairs evaluate`` over a release through a counting proxy, then the same command again (the
   finished folder is reused) and into a new folder with the same response cache: requests counted at the proxy
   (goal: 0 for both).
3. Resume: the command killed (SIGKILL) once the proxy has counted half the images' requests, then run again:
   the rerun's requests against the bound "the half not yet answered + one chunk" (answers already given come
   from the cache, finished chunks from the run folder).
4. Client overhead: `ServedModel.classify` one request at a time vs a bare ``openai`` client loop sending the
   same messages (the image as a PNG data URL) to the same server, interleaved rounds; the median per-round ratio
   (goal <= 1.05x) and the difference per request.

Timings are side by side in one run; on a shared machine other processes distort them (the load average is
printed with them). Request counts are exact.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ.setdefault("SAFETYPAIRS_NO_PROGRESS", "1")

from bench_evaluate import write_release  # noqa: E402
from harness import interleaved, load_line, print_overhead  # noqa: E402


def _images(release: Path) -> list:
    from safetypairs.engine.datafiles import load_release
    from safetypairs.images import load_image

    return [load_image(cell) for cell in load_release(str(release), "images", "auto")["image"]]


def _guard(model: str, url: str, **options: object):
    from safetypairs.backends.registry import build_backend

    text = ",".join(f"{k}={v}" for k, v in {"base_url": url, "cache": "off", **options}.items())
    return build_backend("guards", f"openai:{model},{text}")


def concurrency(model: str, url: str, images: list, rounds: int) -> None:
    """8 requests in flight vs 1 at a time over the same images (cache off)."""
    from safetypairs.policy import load_policy

    policy, categories = load_policy("llavaguard"), [None] * len(images)
    sequential, concurrent = _guard(model, url, max_concurrency=1), _guard(model, url, max_concurrency=8)
    sequential.classify(images[:1], categories[:1], policy)  # warm-up: connection, server's first call
    paths = {"1 in flight": lambda r: sequential.classify(images, categories, policy),
             "8 in flight": lambda r: concurrent.classify(images, categories, policy)}
    seconds = interleaved(paths, rounds)
    ratios = [s / c for s, c in zip(seconds["1 in flight"]["wall"], seconds["8 in flight"]["wall"])]
    print(f"concurrency, {len(images)} requests, {rounds} interleaved rounds ({load_line()}):")
    for name, runs in seconds.items():
        print(f"  {name:<12} s/round {' '.join(f'{v:6.2f}' for v in runs['wall'])}   "
              f"{len(images) / statistics.median(runs['wall']):6.2f} requests/s")
    print(f"  throughput 8 in flight / 1 in flight: per round {' '.join(f'{x:.2f}' for x in ratios)}   "
          f"median {statistics.median(ratios):.2f}x")


def _evaluate_cli(release: Path, spec: str, out: Path, chunk_size: int) -> list[str]:
    return [sys.executable, "-m", "safetypairs", "evaluate", "--dataset", str(release), "--guard", spec, "--out",
            str(out), "--chunk-size", str(chunk_size), "--bootstrap", "0", "--device", "cpu"]


def _evaluate(release: Path, spec: str, out: Path, chunk_size: int) -> None:
    """The CLI's path in this process (no interpreter start-up per run)."""
    from safetypairs.engine.runner import RunConfig
    from safetypairs.evaluate.stage import EvaluateConfig, evaluate_run

    evaluate_run(str(release), EvaluateConfig(guards=(spec,), n_bootstrap=0, device="cpu"),
                 RunConfig(out, chunk_size=chunk_size))


def rerun_and_resume(model: str, url: str, release: Path, n: int, work: Path, chunk_size: int) -> None:
    """Requests a finished run's rerun and a killed run's resume send, counted at a proxy."""
    from served_server import FaultProxy

    proxy = FaultProxy(url)
    try:
        spec = f"openai:{model},base_url={proxy.url},cache={work / 'rerun.sqlite'}"
        _evaluate(release, spec, work / "rerun", chunk_size)
        first = proxy.requests
        _evaluate(release, spec, work / "rerun", chunk_size)
        reused = proxy.requests - first
        _evaluate(release, spec, work / "rerun-new-folder", chunk_size)
        cached = proxy.requests - first - reused
        print(f"rerun of a finished run ({n} images, chunk {chunk_size}): first run {first} requests; the same folder "
              f"again {reused} requests; a new folder, same cache {cached} requests (goal: 0 and 0)")

        spec = f"openai:{model},base_url={proxy.url},cache={work / 'resume.sqlite'},max_concurrency=1"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SAFETYPAIRS_NO_PROGRESS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
        killed = subprocess.Popen(_evaluate_cli(release, spec, work / "resume", chunk_size), env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start, deadline = proxy.requests, time.monotonic() + 600
        while proxy.requests - start < n // 2 and time.monotonic() < deadline and killed.poll() is None:
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        before = proxy.requests - start
        _evaluate(release, spec, work / "resume", chunk_size)
        after = proxy.requests - start - before
        bound = n - before + chunk_size
        print(f"resume after a kill at 50%: killed after {before} of {n} requests; the rerun sent {after} "
              f"({after / n:.0%} of {n}; bound: the {n - before} unanswered + one chunk of {chunk_size} = {bound}: "
              f"{'within' if after <= bound else 'OVER'})")
    finally:
        proxy.close()


def client_overhead(model: str, url: str, images: list, rounds: int) -> None:
    """`ServedModel.classify` one at a time vs a bare ``openai`` loop sending the same messages."""
    import openai

    from safetypairs.backends.vlm_guards import render_guard_prompt
    from safetypairs.policy import load_policy

    policy = load_policy("llavaguard")
    guard = _guard(model, url, max_concurrency=1)
    prompt = render_guard_prompt("hf-vlm", policy, None, "all")
    client = openai.OpenAI(api_key="unused", base_url=url, max_retries=0)

    def bare(_: int) -> None:
        for image in images:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            url_ = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
            client.chat.completions.create(model=model, max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=10,
                                           messages=[{"role": "user", "content": [
                                               {"type": "image_url", "image_url": {"url": url_}},
                                               {"type": "text", "text": prompt}]}])

    bare(0)  # warm-up
    seconds = interleaved({"bare openai loop": bare,
                           "ServedModel.classify": lambda r: guard.classify(images, [None] * len(images), policy)},
                          rounds)
    print_overhead(f"client overhead, {len(images)} requests one at a time, {rounds} interleaved rounds "
                   f"({load_line()}):", seconds, "bare openai loop", 1.05)
    extra = statistics.median(s - b for s, b in zip(seconds["ServedModel.classify"]["wall"],
                                                      seconds["bare openai loop"]["wall"]))
    print(f"  per request: {1000 * extra / len(images):+.1f} ms (median over rounds)")


def main() -> None:
    """Start the server, run the four parts and print their numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="images (default: 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--chunk-size", type=int, default=None, help="evaluate chunk size (default: n / 8)")
    args = parser.parse_args()
    import datasets
    from served_server import served
    from tiny_models import build_tiny_answering_vlm

    datasets.disable_progress_bars()
    chunk_size = args.chunk_size or max(1, args.n // 8)
    print(f"bench_served ({load_line()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    with tempfile.TemporaryDirectory(prefix="bench-served-") as tmp:
        work = Path(tmp)
        model = build_tiny_answering_vlm(work / "tiny-guard")
        release = write_release(args.n, Path(tempfile.mkdtemp(prefix="release-", dir=work)))
        images = _images(release)
        with served(model, work / "serve.log") as url:
            concurrency(model, url, images, args.rounds)
            rerun_and_resume(model, url, release, args.n, work, chunk_size)
            client_overhead(model, url, images, args.rounds)
    print(f"done ({load_line()})")


if __name__ == "__main__":
    main()
