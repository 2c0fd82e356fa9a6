"""Served models: instructor, judge and guard ``openai:<model>`` behind any OpenAI-compatible Chat Completions server
(vLLM, SGLang, TGI, ``transformers serve``) or the OpenAI API itself.

The prompts are the in-process backends' own (the instruction template of `vlm_instruct`, and `vlm_guards`'
``hf-vlm`` / ``llavaguard`` prompt formats), so a served LlavaGuard reads what the in-process one reads. Images go as
PNG data URLs. A score is read from ``top_logprobs`` when the server returns them (P(unsafe) of the verdict token),
else the verdict is the parsed text and the score is left out; each answer says which. The ``openai`` client does the
retries (exponential backoff with jitter, ``Retry-After``) and the timeouts; this module adds what it lacks: requests
in flight at once, a response cache on disk that every process of a run shares, the row's status when the last
retry failed (``api_error``: the rest of the run goes on), and counts (requests, retries, tokens, latencies).

The API key is read from the environment variable an option names and is never written: not to ``run.json``, a log,
an error, the cache or a card. The cache key holds the model, the messages (images by their pixel digest) and the
generation settings, not the host or the key, so resumed and re-run commands never pay twice for an answer.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.backends.base import InstructResult, Verdict
from safetypairs.backends.options import Argument, Option
from safetypairs.backends.vlm_guards import (HF_VLM_ANSWER_TOKENS, LLAVAGUARD_ANSWER_TOKENS, SCOPES, parse_llavaguard,
                                             parse_safe_unsafe, render_guard_prompt)
from safetypairs.backends.vlm_instruct import UnparsableAnswer, build_prompt, parse_answer
from safetypairs.images import image_digest
from safetypairs.policy import Policy
from safetypairs.usage import LATENCY_BUCKETS, Usage
from safetypairs.utils import Range

logger = logging.getLogger(__name__)

PROMPTS = ("hf-vlm", "llavaguard")  # the guard / judge prompt formats a served model gets
DEFAULT_CACHE = Path("~/.cache/safetypairs/responses.sqlite")
# default max_tokens per use; the guards' as their local backends have them
ANSWER_TOKENS = {"hf-vlm": HF_VLM_ANSWER_TOKENS, "llavaguard": LLAVAGUARD_ANSWER_TOKENS, "instruct": 256}
_RATING_PREFIX = re.compile(r'"rating"\s*:\s*"$')


class ServedError(RuntimeError):
    """A served model could not answer one request after every retry (the row gets ``api_error``)."""


class ResponseCache:
    """Answers by request key in SQLite (write-ahead log: several processes, e.g. torchrun ranks, write at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        return db

    def get(self, key: str) -> dict[str, Any] | None:
        """The answer stored under ``key``, or ``None``."""
        row = self._db().execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, answer: dict[str, Any]) -> None:
        """Store an answer (a second writer of the same key keeps the first)."""
        self._db().execute("INSERT OR IGNORE INTO answers (key, answer) VALUES (?, ?)", (key, json.dumps(answer)))


def data_url(image: Image.Image) -> str:
    """An image as a PNG ``data:`` URL (what Chat Completions takes as ``image_url``)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def request_key(model: str, prompt: str, image: Image.Image | None, settings: dict[str, Any]) -> str:
    """The cache key of one request: model, prompt, the image's pixel digest and the generation settings."""
    body = json.dumps({"model": model, "prompt": prompt, "image": None if image is None else image_digest(image),
                       "settings": settings}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _choice_probability(top: list[dict[str, Any]], positive: str, negative: str) -> float | None:
    """P(positive) / (P(positive) + P(negative)) from one token's top logprobs (case and spaces ignored)."""
    mass = {positive: 0.0, negative: 0.0}
    for entry in top:
        word = entry["token"].strip().strip('"').lower()
        for choice in mass:
            if word and choice.startswith(word) and (word == choice or len(word) >= 2):
                mass[choice] += math.exp(entry["logprob"])
                break
    total = mass[positive] + mass[negative]
    return mass[positive] / total if total > 0 else None


def verdict_score(tokens: list[dict[str, Any]] | None, prompt: str) -> float | None:
    """P(unsafe) read from the answer's token logprobs: the first token (``hf-vlm``), or the token after
    ``"rating": "`` (``llavaguard``); ``None`` when the server returned none or the verdict token is not there."""
    if not tokens:
        return None
    if prompt == "hf-vlm":
        return _choice_probability(tokens[0].get("top_logprobs") or [], S.UNSAFE, S.SAFE)
    text = ""
    for token in tokens:
        if _RATING_PREFIX.search(text):
            return _choice_probability(token.get("top_logprobs") or [], S.UNSAFE, S.SAFE)
        text += token["token"]
    return None


@functools.lru_cache(maxsize=16)
def preflight(base_url: str | None, model: str, api_key_env: str, timeout: float) -> None:
    """One cheap request before any row: the server answers and serves ``model`` (once per process).

    Raises:
        ValueError: for a missing key (the OpenAI API), an unreachable server, or a model it does not serve.
    """
    import openai

    client = _client(base_url, api_key_env, timeout=min(timeout, 30.0), max_retries=1)
    where = base_url or "the OpenAI API"
    try:
        served = [m.id for m in client.models.list()]
    except openai.AuthenticationError as err:
        raise ValueError(f"{where} refused the API key in ${api_key_env} ({err.status_code})") from None
    except openai.APIConnectionError as err:
        raise ValueError(f"cannot reach {where}: {type(err.__cause__ or err).__name__}; start the server or fix "
                         "base_url (e.g. base_url=http://127.0.0.1:8000/v1)") from None
    except openai.APIStatusError as err:
        raise ValueError(f"{where} answered {err.status_code} to GET /models; check base_url") from None
    if served and model not in served:
        raise ValueError(f"{where} does not serve {model!r}; it serves: {', '.join(served[:10])}")


def _client(base_url: str | None, api_key_env: str, timeout: float, max_retries: int,
            hooks: list[Any] | None = None) -> Any:
    """An ``openai.OpenAI`` client; the key comes from ``$api_key_env`` and is needed for the OpenAI API only."""
    import httpx
    import openai

    key = os.environ.get(api_key_env)
    if not key and base_url is None:
        raise ValueError(f"the OpenAI API needs a key: set ${api_key_env} (or name another variable with "
                         "api_key_env=...), or give base_url= for a local server")
    http = httpx.Client(event_hooks={"request": hooks or []}, timeout=timeout)
    return openai.OpenAI(api_key=key or "unused", base_url=base_url, timeout=timeout, max_retries=max_retries,
                         http_client=http)


class ServedModel:
    """``openai:<model>[,base_url=...,prompt=hf-vlm|llavaguard,...]``: a served chat VLM as instructor, judge or guard.

    Without ``base_url`` the OpenAI API is used (the key from ``$OPENAI_API_KEY``, or the variable ``api_key_env``
    names). As an instructor it gets the in-process instructor's prompt and answer format; as a judge or guard the
    ``hf-vlm`` one-word prompt or LlavaGuard's (``prompt=llavaguard``).
    """

    ARGUMENT = Argument("<model name on the server>")
    IN_PROCESS = False  # holds no model in this process (`evaluate.stage.guard_order`)
    OPTIONS = {
        "base_url": Option(str, "the server's OpenAI-compatible URL, e.g. http://127.0.0.1:8000/v1 (unset: the OpenAI "
                                "API)"),
        "api_key_env": Option(str, "environment variable holding the API key (read, never written anywhere)",
                              "OPENAI_API_KEY"),
        "prompt": Option(PROMPTS, "guard/judge prompt format: hf-vlm (one word) or llavaguard (its JSON)", "hf-vlm"),
        "scope": Option(SCOPES, "all: the whole policy in the prompt; category: only the row's category", "all"),
        "max_tokens": Option(int, "answer length in tokens (unset: " + ", ".join(f"{n} {use}" for use, n in ANSWER_TOKENS.items())
                             + ")", None, Range(1, optional=True)),
        "temperature": Option(float, "sampling temperature (0: greedy, what the cache assumes)", 0.0, Range(0, 2)),
        "logprobs": Option(bool, "ask for top logprobs to score P(unsafe); without them the text verdict counts",
                           True),
        "max_concurrency": Option(int, "requests in flight at once", 8, Range(1, 256)),
        "timeout": Option(float, "seconds per request before it is retried", 120.0, Range(0, open_low=True)),
        "max_retries": Option(int, "retries of a request on 429, 5xx, timeouts and dropped connections (the openai "
                                   "client's exponential backoff with jitter; Retry-After honoured)", 5, Range(0)),
        "cache": Option(str, f"response cache file (SQLite; unset: {DEFAULT_CACHE}); 'off' turns it off"),
    }

    def __init__(self, model: str, options: dict[str, Any]) -> None:
        self.model, self.o = model, options
        self.usage = Usage()
        self._lock = threading.Lock()
        self.client = _client(options["base_url"], options["api_key_env"], options["timeout"],
                              options["max_retries"], hooks=[self._count_request])
        cache = options["cache"]
        self.cache = None if cache == "off" else ResponseCache(Path(cache or DEFAULT_CACHE).expanduser())

    @classmethod
    def from_spec(cls, arg: str, device: str = "cpu", **options: Any) -> "ServedModel":
        """Connect to the server serving ``arg`` (``device`` is the server's business, not this process')."""
        return cls(arg, options)

    @classmethod
    def check_ready(cls, model: str, **options: Any) -> None:
        """Before any row: a key for the OpenAI API, a reachable server that serves ``model`` (one cheap request).

        Raises:
            ValueError: naming what is wrong and how to fix it (never the key).
        """
        preflight(options.get("base_url"), model, options.get("api_key_env") or "OPENAI_API_KEY",
                  float(options.get("timeout") or 120.0))

    def _count_request(self, request: Any) -> None:
        with self._lock:
            self.usage.requests += 1

    def _settings(self, use: str) -> dict[str, Any]:
        return {"max_tokens": self.o["max_tokens"] or ANSWER_TOKENS[use], "temperature": self.o["temperature"],
                "logprobs": self.o["logprobs"] and use != "instruct"}

    def _ask(self, prompt: str, image: Image.Image | None, use: str) -> dict[str, Any]:
        """One answer: from the cache, else from the server (then cached).

        Raises:
            ServedError: when the server could not answer after every retry.
        """
        import openai

        settings = self._settings(use)
        key = request_key(self.model, prompt, image, settings) if self.cache is not None else ""
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            with self._lock:
                self.usage.cache_hits += 1
            return hit
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        if image is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
        extra = {"logprobs": True, "top_logprobs": 10} if settings["logprobs"] else {}
        start = time.perf_counter()
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}], max_tokens=settings["max_tokens"],
                temperature=settings["temperature"], **extra)
        except openai.APIError as err:
            with self._lock:
                self.usage.failures += 1
            cause = f"{type(err).__name__}: {getattr(err, 'status_code', '') or ''} {err.message}".strip()
            raise ServedError(f"{self.model}: {cause} (after {self.o['max_retries']} retries)") from None
        answer = _answer(response)
        self._count_answer(answer, time.perf_counter() - start)
        if self.cache is not None:
            self.cache.put(key, answer)
        return answer

    def _count_answer(self, answer: dict[str, Any], seconds: float) -> None:
        bucket = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
        with self._lock:
            self.usage.answers += 1
            self.usage.prompt_tokens += answer["usage"].get("prompt_tokens") or 0
            self.usage.completion_tokens += answer["usage"].get("completion_tokens") or 0
            self.usage.latency[bucket] += 1

    def _ask_all(self, items: list[tuple[str, Image.Image | None]], use: str) -> list[dict[str, Any] | ServedError]:
        """Every request, ``max_concurrency`` in flight; a failed one is its `ServedError` in place."""
        def one(item: tuple[str, Image.Image | None]) -> dict[str, Any] | ServedError:
            try:
                return self._ask(item[0], item[1], use)
            except ServedError as err:
                return err

        if self.o["max_concurrency"] == 1 or len(items) == 1:  # no thread hand-off per request
            return [one(item) for item in items]
        with ThreadPoolExecutor(max_workers=self.o["max_concurrency"]) as pool:
            return list(pool.map(one, items))

    def classify(self, images: list[Image.Image], categories: list[str | None], policy: Policy) -> list[Verdict]:
        """Ask the served model about each image with the policy prompt; score from logprobs when given."""
        prompt = self.o["prompt"]
        rendered = {c: render_guard_prompt(prompt, policy, c, self.o["scope"]) for c in set(categories)}
        texts = [rendered[c] for c in categories]
        verdicts = []
        for answer in self._ask_all(list(zip(texts, images)), prompt):
            if isinstance(answer, ServedError):
                verdicts.append(Verdict(S.UNKNOWN, None, str(answer), "", status=ST.API_ERROR))
                continue
            verdicts.append(self._verdict(answer, prompt))
        return verdicts

    def _verdict(self, answer: dict[str, Any], prompt: str) -> Verdict:
        text = answer["text"]
        score = verdict_score(answer.get("logprobs"), prompt) if self.o["logprobs"] else None
        with self._lock:
            if score is None:
                self.usage.scored_by_text += 1
            else:
                self.usage.scored_by_logprobs += 1
        if prompt == "llavaguard":
            label, category, rationale = parse_llavaguard(text)
            reason = f"{category}: {rationale}".strip(": ") if label != S.UNKNOWN else rationale
        else:
            label = parse_safe_unsafe(text)
            reason = f"answered {text[:80]!r}" if label != S.UNKNOWN else f"unparsable answer {text[:80]!r}"
        raw = json.dumps({"answer": text, "score_from": "logprobs" if score is not None else "text"})
        return Verdict(label, score, reason, raw)

    def instruct(self, rows: list[dict[str, Any]], policy: Policy) -> list[InstructResult]:
        """The in-process instructor's prompt for each row (its image and category), its JSON answer parsed."""
        items = [(build_prompt(row, policy), row.get(S.IMAGE)) for row in rows]
        results = []
        for answer in self._ask_all(items, "instruct"):
            if isinstance(answer, ServedError):
                results.append(InstructResult(None, None, "", ST.API_ERROR, str(answer)))
                continue
            try:
                parsed = parse_answer(answer["text"])
            except UnparsableAnswer as err:
                results.append(InstructResult(None, None, answer["text"], ST.UNPARSABLE, str(err)))
                continue
            results.append(InstructResult(parsed["instruction"], parsed.get("element"), answer["text"]))
        return results


def _answer(response: Any) -> dict[str, Any]:
    """What is kept of a Chat Completions response: the text, the token logprobs (when any) and the usage."""
    choice = response.choices[0]
    tokens = None
    if getattr(choice, "logprobs", None) is not None and choice.logprobs.content:
        tokens = [{"token": t.token, "logprob": t.logprob,
                   "top_logprobs": [{"token": c.token, "logprob": c.logprob} for c in (t.top_logprobs or [])]}
                  for t in choice.logprobs.content]
    usage = response.usage.model_dump() if getattr(response, "usage", None) is not None else {}
    return {"text": choice.message.content or "", "logprobs": tokens,
            "usage": {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}}
