"""Review app latency and memory with N vs 10N candidates, in a real browser (Debian chromium + chromedriver).

    python benchmarks/bench_review.py [--n 300] [--factor 10] [--size 384] [--decisions 30]

For each folder size a fresh ``safetypairs review`` process is started (chromium is started first and
not counted) and measured:

- start -> first pair on screen: process launch until the page shows all images of the first pair;
- decision -> next pair on screen: in the page, from the ``A`` key press until the next candidate id
  and all its images are loaded (measured with ``performance.now()`` inside the browser, median and max
  over ``--decisions`` presses);
- server memory: VmRSS and RssAnon of the server process after the decisions (flat in N is the goal).

Also printed side by side: serving an image's stored bytes (what the app does) vs decoding it and
re-encoding PNG per request (what handing a PIL image to ``gr.Image`` costs).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PRESS = """
const done = arguments[arguments.length - 1];
const field = () => document.querySelector('#sp-candidate textarea, #sp-candidate input').value;
const before = field(), t0 = performance.now();
document.body.dispatchEvent(new KeyboardEvent('keydown', {key: 'a', bubbles: true}));
const check = () => {
  const imgs = [...document.querySelectorAll('#sp-pair .sp-grid img')];
  if (field() !== before && imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0)) {
    done(performance.now() - t0);
  } else { requestAnimationFrame(check); }
};
requestAnimationFrame(check);
"""
LOADED = """return [...document.querySelectorAll('#sp-pair .sp-grid img')].length > 0 &&
  [...document.querySelectorAll('#sp-pair .sp-grid img')].every(i => i.complete && i.naturalWidth > 0)"""


def generate(path: Path, n: int, size: int) -> None:
    """Write ``n`` accepted validated candidates (JPEG crops of real skimage photos, PNG masks) with save_to_disk."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image
    from skimage import data as skdata

    from safetypairs import schema as S

    photos = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in ("astronaut", "coffee", "rocket")]
    features = S.with_columns(S.with_columns(S.with_columns(S.SOURCE_FEATURES, S.INSTRUCT_FEATURES),
                                             S.EDIT_FEATURES), S.VALIDATION_FEATURES)

    def encode(image: Image.Image, fmt: str) -> dict:
        buf = io.BytesIO()
        image.save(buf, format=fmt, quality=90)
        return {"bytes": buf.getvalue(), "path": None}

    def rows():
        rng = np.random.default_rng(0)
        for i in range(n):
            photo = photos[i % len(photos)]
            x, y = rng.integers(0, photo.width - size), rng.integers(0, photo.height - size)
            orig = photo.crop((x, y, x + size, y + size))
            edited, mask = orig.copy(), Image.new("L", orig.size)
            box = (size // 8, size // 8, size // 3, size // 4)
            edited.paste((40, 200, 40), box)
            mask.paste(255, box)
            yield {S.SOURCE_ID: f"src-{i:05d}", S.CANDIDATE: 0, S.IMAGE: encode(orig, "JPEG"),
                   S.EDITED_IMAGE: encode(edited, "JPEG"), S.CONTROL_IMAGE: encode(orig, "JPEG"),
                   S.EDIT_MASK: encode(mask, "PNG"), S.CATEGORY: "O1", S.POLICY: "llavaguard@1",
                   S.INSTRUCTION: f"replace the caption of image {i}", S.ELEMENT: "caption", S.ACCEPTED: True,
                   S.CHANGED_FRACTION: 0.05, S.SSIM_OUTSIDE: 0.97, S.PSNR_OUTSIDE: 40.0, S.JUDGE: "ocr-lexicon",
                   S.JUDGE_ORIGINAL: "unsafe", S.JUDGE_EDITED: "safe"}

    data = Dataset.from_list([{name: row.get(name) for name in features} for row in rows()], features=features)
    data.save_to_disk(str(path))


def _status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(30)
    return driver


def measure(folder: Path, decisions: int) -> dict:
    """Start a review server on ``folder`` and time the first pair and ``decisions`` decisions in chromium."""
    driver = _browser()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "safetypairs", "-q", "review", str(folder), "--reviewer", "bench",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        ready = time.perf_counter() - start
        driver.get(url)
        while not driver.execute_script(LOADED):
            time.sleep(0.01)
        first = time.perf_counter() - start
        times = [driver.execute_async_script(PRESS) for _ in range(decisions)]
        return {"ready_s": ready, "first_pair_s": first, "median_ms": statistics.median(times),
                "max_ms": max(times), "rss_mb": _status_mb(proc.pid, "VmRSS"),
                "anon_mb": _status_mb(proc.pid, "RssAnon")}
    finally:
        driver.quit()
        proc.terminate()
        proc.wait()


def serving_cost(folder: Path, repeats: int = 200) -> tuple[float, float]:
    """Milliseconds per image: stored bytes as the app serves them vs decode + PNG re-encode."""
    from safetypairs.images import load_image
    from safetypairs.review.app import ReviewConfig, ReviewSource

    source = ReviewSource(folder, ReviewConfig("bench"))
    rows = [i % len(source.meta) for i in range(repeats)]  # a small folder's rows, each served several times
    t = time.perf_counter()
    for i in rows:
        source.image(i, "original")
    stored = (time.perf_counter() - t) / repeats * 1000
    t = time.perf_counter()
    for i in rows:
        load_image(source.image(i, "original")[0]).save(io.BytesIO(), format="PNG")
    reencoded = (time.perf_counter() - t) / repeats * 1000
    return stored, reencoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--decisions", type=int, default=30)
    args = parser.parse_args()
    if not 0 < args.decisions < args.n:
        parser.error(f"--decisions must be between 1 and --n - 1 (each decision needs a next pair), got {args.decisions}")
    os.environ["SAFETYPAIRS_NO_PROGRESS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for n in (args.n, args.n * args.factor):
            folder = Path(tmp) / f"n{n}"
            t = time.perf_counter()
            generate(folder, n, args.size)
            print(f"generated {n} candidates ({args.size}px JPEG) in {time.perf_counter() - t:.1f}s", flush=True)
            results[n] = measure(folder, args.decisions)
            r = results[n]
            print(f"n={n}: server ready {r['ready_s']:.2f}s, first pair on screen {r['first_pair_s']:.2f}s after "
                  f"start; decision -> next pair median {r['median_ms']:.0f} ms, max {r['max_ms']:.0f} ms "
                  f"({args.decisions} decisions); server RSS {r['rss_mb']:.0f} MB (anon {r['anon_mb']:.0f} MB)",
                  flush=True)
        small, big = results[args.n], results[args.n * args.factor]
        print(f"memory ratio {args.n * args.factor} vs {args.n} candidates: RSS x{big['rss_mb'] / small['rss_mb']:.2f}, "
              f"anon x{big['anon_mb'] / small['anon_mb']:.2f}")
        stored, reencoded = serving_cost(Path(tmp) / f"n{args.n * args.factor}")
        print(f"per image: stored bytes {stored:.2f} ms vs decode + PNG re-encode {reencoded:.2f} ms "
              f"(x{reencoded / stored:.0f})")


if __name__ == "__main__":
    main()
