"""The review app: a Gradio page over a validated folder, one candidate at a time, decisions to ``review.jsonl``."""

from __future__ import annotations

import html
import io
import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Image as ImageFeature
from PIL import Image

from safetypairs import schema as S
from safetypairs import statuses as ST
from safetypairs.engine.datafiles import read_rows
from safetypairs.review.store import (
    ACCEPT,
    CONTENT_COLUMNS,
    REASONS,
    REJECT,
    append_decision,
    candidate_ids,
    cell_bytes,
    content_stamp,
    latest_decisions,
    make_decision,
    read_decisions,
    split_stale,
)
from safetypairs.engine.stage import undecoded
from safetypairs.utils import REVIEW_SCOPES

logger = logging.getLogger(__name__)

# (name in the URL, column, caption); the mask is drawn in red over the edit by the browser
VIEWS = (("original", S.IMAGE, "original (unsafe)"), ("edit", S.EDITED_IMAGE, "edit (should be safe)"),
         ("control", S.CONTROL_IMAGE, "artifact control"), ("mask", S.EDIT_MASK, "change mask over the edit"))
IMAGE_ROUTE = "/review-image"
INFO_COLUMNS = (S.INSTRUCTION, S.ELEMENT, S.CATEGORY, S.POLICY, S.CHANGED_FRACTION, S.CHANGE_SPREAD, S.SSIM_OUTSIDE,
                S.PSNR_OUTSIDE, S.LPIPS_OUTSIDE, S.CLIP_OUTSIDE, S.JUDGE, S.JUDGE_ORIGINAL, S.JUDGE_EDITED)
KEYS = {"a": "sp-accept", "r": "sp-reject", "s": "sp-skip", "b": "sp-back"}
HEAD = """<script>
document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (e.ctrlKey || e.metaKey || e.altKey || (t && (t.tagName === 'TEXTAREA' ||
      (t.tagName === 'INPUT' && t.type !== 'radio')))) return;
  const ids = __KEYS__, k = e.key.toLowerCase();
  if (ids[k]) { document.getElementById(ids[k])?.click(); e.preventDefault(); return; }
  const n = parseInt(k, 10);
  const radios = document.querySelectorAll('#sp-reason input[type=radio]');
  if (n >= 1 && n <= radios.length) { radios[n - 1].click(); e.preventDefault(); }
});
</script>"""
CSS = """
#sp-pair .sp-grid {display: grid; grid-template-columns: repeat(4, 1fr); gap: 8px;}
#sp-pair figure {margin: 0; text-align: center;}
#sp-pair .sp-zoom {display: block !important; position: relative; line-height: 0;}
#sp-pair .sp-zoom img {display: block; margin: 0 !important; width: 100%; height: auto; max-width: none;}
#sp-pair .sp-mask {position: absolute; inset: 0; background: rgba(255, 0, 0, 0.55); mask-size: 100% 100%;
  -webkit-mask-size: 100% 100%; mask-mode: luminance;}
#sp-pair .sp-none {padding: 40% 0; background: #eee; color: #777;}
#sp-pair .sp-prefetch {display: none;}
"""


@dataclass(frozen=True)
class ReviewConfig:
    """Settings of ``safetypairs review``.

    Attributes:
        reviewer: the name stored with each decision.
        scope: which candidates to show, by their automatic decision: one of `utils.REVIEW_SCOPES`.
        host: the address to serve on (localhost by default).
        port: the port to serve on.
    """

    reviewer: str
    scope: str = "accepted"
    host: str = "127.0.0.1"
    port: int = 7860

    def __post_init__(self) -> None:
        if not self.reviewer.strip() or "\n" in self.reviewer:
            raise ValueError(f"reviewer must be a non-empty single line, got {self.reviewer!r}")
        if self.scope not in REVIEW_SCOPES:
            raise ValueError(f"scope must be one of {REVIEW_SCOPES}, got {self.scope!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


def is_borderline(row: dict[str, Any]) -> bool:
    """Whether a candidate sits near a locality limit it was decided with, or the judge was unsure.

    The limits are the ones the row records (``validate_limits``, written by validation), so a thresholds file
    or an override counts as it did; a row without them (validated before they were recorded) is borderline
    only through the judge. Near means within half the minimum element fraction, 0.05 of the maximum changed
    fraction and change spread, 0.02 SSIM, 2 dB PSNR.

    Args:
        row: non-image columns of one validated row.

    Returns:
        ``True`` when a score is near its limit (on either side) or the reject reason is ``judge_unknown``.
    """
    limits = json.loads(row.get(S.VALIDATE_LIMITS) or "{}")
    checks = [(S.CHANGE_ELEMENT, "min_element_fraction", 0.5 * limits.get("min_element_fraction", 0.0)),
              (S.CHANGED_FRACTION, "max_changed_fraction", 0.05), (S.CHANGE_SPREAD, "max_change_spread", 0.05),
              (S.SSIM_OUTSIDE, "min_ssim_outside", 0.02), (S.PSNR_OUTSIDE, "min_psnr_outside", 2.0)]
    near = any(row.get(col) is not None and limits.get(name) is not None and abs(row[col] - limits[name]) <= margin
               for col, name, margin in checks)
    return near or row.get(S.REJECT_REASON) == ST.JUDGE_UNKNOWN


def in_scope(row: dict[str, Any], scope: str) -> bool:
    """Whether a row belongs to a review scope (one of `REVIEW_SCOPES`) by its automatic decision.

    Raises:
        ValueError: for an unknown scope.
    """
    if scope not in REVIEW_SCOPES:
        raise ValueError(f"scope must be one of {REVIEW_SCOPES}, got {scope!r}")
    if scope == "borderline":
        return is_borderline(row)
    return scope == "all" or bool(row.get(S.ACCEPTED)) == (scope == "accepted")


class ReviewSource:
    """A validated folder for the app: non-image columns in memory, image bytes read from the data per request."""

    def __init__(self, folder: str | Path, config: ReviewConfig):
        self.folder, self.config = Path(folder), config
        rows = read_rows(folder)
        images = [name for name, f in rows.features.items() if isinstance(f, ImageFeature)]
        self.meta = rows.select_columns([c for c in rows.column_names if c not in images]).to_list()
        self.ids = candidate_ids(rows)
        self.index = {cid: i for i, cid in enumerate(self.ids)}
        plain = undecoded(rows)
        self.images = {column: plain.select_columns([column]) for _, column, _ in VIEWS if column in images}
        self.scope_rows = [i for i, row in enumerate(self.meta) if in_scope(row, config.scope)]
        self._lock = threading.Lock()
        self._stamps: dict[int, str] = {}
        self.decided = self._own_decisions()

    def stamp(self, row: int) -> str:
        """The `review.store.content_stamp` of ``row``'s images (cached)."""
        if row not in self._stamps:
            self._stamps[row] = content_stamp(self.images[c][row][c] for c in CONTENT_COLUMNS if c in self.images)
        return self._stamps[row]

    def _own_decisions(self) -> dict[str, str]:
        """This reviewer's last decisions on the images the rows have now (stale ones are to be made again)."""
        mine = [r for r in read_decisions(self.folder) if r["reviewer"] == self.config.reviewer]
        stamps = {r["candidate_id"]: self.stamp(self.index[r["candidate_id"]]) for r in mine
                  if r.get("content") and r["candidate_id"] in self.index}
        latest = latest_decisions(split_stale(mine, stamps)[0])
        return {cid: per[self.config.reviewer]["decision"] for cid, per in latest.items()}

    def pending(self) -> list[int]:
        """In-scope rows this reviewer has not decided yet (re-read from the file: resumes after a restart)."""
        with self._lock:
            self.decided = self._own_decisions()
            return [i for i in self.scope_rows if self.ids[i] not in self.decided]

    def decide(self, row: int, decision: str, reason: str | None, note: str) -> None:
        """Record this reviewer's decision on ``row`` (appended to ``review.jsonl``)."""
        record = make_decision(self.config.reviewer, self.ids[row], decision, reason, note, self.stamp(row))
        append_decision(self.folder, record)
        with self._lock:
            self.decided[self.ids[row]] = decision

    def image(self, row: int, view: str) -> tuple[bytes, str] | None:
        """The stored bytes of one image and their media type (``None`` when the cell is empty)."""
        column = next((c for name, c, _ in VIEWS if name == view), None)
        if column not in self.images or not 0 <= row < len(self.meta):
            return None
        cell = self.images[column][row][column]
        data = cell_bytes(cell)
        if not data:
            return None
        try:
            kind = Image.open(io.BytesIO(data)).format or ""  # reads the header only
        except OSError:
            return None
        return data, Image.MIME.get(kind, "application/octet-stream")

    def has_image(self, row: int, column: str) -> bool:
        """Whether ``row`` has a value in an image column (reads the cell's bytes, not pixels)."""
        return column in self.images and self.images[column][row][column] is not None


def _img(src: str, alt: str, mask: str = "") -> str:
    """An image linking to itself at full size (click to zoom), with the change mask drawn over it if given."""
    over = f"<span class='sp-mask' style=\"mask-image:url({mask});-webkit-mask-image:url({mask})\"></span>" if mask else ""
    return f'<a class="sp-zoom" href="{src}" target="_blank" title="open full size"><img src="{src}" alt="{alt}">{over}</a>'


def pair_html(source: ReviewSource, row: int | None, next_row: int | None = None) -> str:
    """The four images of one candidate (original | edit | control | mask over the edit), next row prefetched."""
    if row is None:
        return "<p id='sp-done'>Nothing left to review in this scope.</p>"
    cells = []
    for view, column, caption in VIEWS:
        src = f"{IMAGE_ROUTE}/{row}/{view}"
        if not source.has_image(row, column):
            body = f"<div class='sp-none'>no {view}</div>"
        elif view == "mask" and source.has_image(row, S.EDITED_IMAGE):
            body = _img(f"{IMAGE_ROUTE}/{row}/edit", "mask over edit", mask=src)
        else:
            body = _img(src, view)
        cells.append(f"<figure>{body}<figcaption>{caption}</figcaption></figure>")
    prefetch = ""
    if next_row is not None:
        prefetch = "".join(f"<img src='{IMAGE_ROUTE}/{next_row}/{v}' alt=''>" for v, c, _ in VIEWS
                           if source.has_image(next_row, c))
    return f"<div class='sp-grid' data-row='{row}'>{''.join(cells)}</div><div class='sp-prefetch'>{prefetch}</div>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return html.escape(text).replace("|", "\\|").replace("\n", " ")


def info_markdown(source: ReviewSource, row: int | None) -> str:
    """Instruction, element, locality scores, judge verdicts and the automatic and own decisions, as markdown."""
    if row is None:
        return ""
    meta = source.meta[row]
    auto = "accepted" if meta.get(S.ACCEPTED) else f"rejected ({_fmt(meta.get(S.REJECT_REASON))})"
    mine = source.decided.get(source.ids[row], "not decided yet")
    lines = ["| field | value |", "|---|---|", f"| automatic decision | {auto} |", f"| your decision | {mine} |"]
    lines += [f"| {col} | {_fmt(meta.get(col))} |" for col in INFO_COLUMNS if col in meta]
    return "\n".join(lines)


class ReviewSession:
    """The app's event handlers; each browser or client session keeps its own queue in a ``gr.State``."""

    def __init__(self, source: ReviewSource):
        self.source = source
        self.scope_ids = {source.ids[i] for i in source.scope_rows}

    def _state(self, state: dict[str, Any] | None) -> dict[str, Any]:
        return state if state else {"queue": self.source.pending(), "pos": 0}

    def view(self, state: dict[str, Any]) -> tuple:
        """The outputs for the current position: pair, info, candidate id, progress, state, reason, note."""
        queue, pos = state["queue"], state["pos"]
        row = queue[pos] if pos < len(queue) else None
        nxt = queue[pos + 1] if pos + 1 < len(queue) else None
        done = len(self.scope_ids.intersection(self.source.decided))
        total = len(self.scope_ids)
        progress = f"**{done} done / {total - done} left** of {total} candidates in scope `{self.source.config.scope}`"
        cid = self.source.ids[row] if row is not None else ""
        return pair_html(self.source, row, nxt), info_markdown(self.source, row), cid, progress, state, None, ""

    def current(self, state: dict[str, Any] | None) -> tuple:
        """Show the current candidate (the first undecided one for a new session)."""
        return self.view(self._state(state))

    def act(self, decision: str, reason: str | None, note: str, state: dict[str, Any] | None) -> tuple:
        """Accept, reject (with a reason) or skip the current candidate and move to the next."""
        import gradio as gr

        state = self._state(state)
        queue, pos = state["queue"], state["pos"]
        if pos >= len(queue):
            return self.view(state)
        if decision == "skip":
            queue.append(queue[pos])
        else:
            try:
                self.source.decide(queue[pos], decision, reason or None, note or "")
            except ValueError as err:
                raise gr.Error(str(err)) from err
        state["pos"] = pos + 1
        return self.view(state)

    def back(self, state: dict[str, Any] | None) -> tuple:
        """Go back to the previous candidate of this session (deciding again replaces the earlier decision)."""
        state = self._state(state)
        state["pos"] = max(0, state["pos"] - 1)
        return self.view(state)


def build_app(source: ReviewSource) -> Any:
    """The Gradio page (``gr.Blocks``); API names ``current``, ``accept``, ``reject``, ``skip``, ``back``.

    Args:
        source: the folder's rows and decisions.

    Returns:
        A `gradio.Blocks` (not launched).
    """
    import gradio as gr

    session = ReviewSession(source)
    config = source.config
    with gr.Blocks(title=f"safetypairs review: {source.folder.name}", analytics_enabled=False) as app:
        state = gr.State(None)
        gr.Markdown(f"### Review `{html.escape(str(source.folder))}` as **{html.escape(config.reviewer)}** - keys: "
                    "**A** accept, **R** reject (reason **1-5** first), **S** skip, **B** back; click an image to zoom")
        progress = gr.Markdown(elem_id="sp-progress")
        pair = gr.HTML(elem_id="sp-pair")
        with gr.Row():
            info = gr.Markdown(elem_id="sp-info")
            with gr.Column():
                cid = gr.Textbox(label="candidate", interactive=False, elem_id="sp-candidate")
                reason = gr.Radio([(f"{i}. {k}: {v}", k) for i, (k, v) in enumerate(REASONS.items(), 1)],
                                  label="reject reason", elem_id="sp-reason")
                note = gr.Textbox(label="note (needed for 'other')", elem_id="sp-note")
                with gr.Row():
                    accept = gr.Button("Accept (A)", variant="primary", elem_id="sp-accept")
                    reject = gr.Button("Reject (R)", variant="stop", elem_id="sp-reject")
                    skip = gr.Button("Skip (S)", elem_id="sp-skip")
                    back = gr.Button("Back (B)", elem_id="sp-back")
        outputs = [pair, info, cid, progress, state, reason, note]
        app.load(session.current, [state], outputs, api_name="current")
        for button, decision in ((accept, ACCEPT), (reject, REJECT), (skip, "skip")):
            button.click(lambda r, n, s, d=decision: session.act(d, r, n, s), [reason, note, state], outputs,
                         api_name=decision, concurrency_limit=None)
        back.click(session.back, [state], outputs, api_name="back")
    return app


def create_server(folder: str | Path, config: ReviewConfig) -> Any:
    """The app as a FastAPI application: the Gradio page plus a route serving the stored image bytes.

    Args:
        folder: a validated folder (anything `datafiles.read_rows` reads).
        config: reviewer and scope.

    Returns:
        A `fastapi.FastAPI` app to run with uvicorn.
    """
    import gradio as gr
    from fastapi import FastAPI, Response

    source = ReviewSource(folder, config)
    server = FastAPI()

    @server.get(IMAGE_ROUTE + "/{row}/{view}")
    def image(row: int, view: str) -> Response:
        found = source.image(row, view)
        if found is None:
            return Response(status_code=404)
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "private, max-age=3600"})

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts: offline
    logger.info("review: %d candidates in scope %r, %d left for %s", len(source.scope_rows), config.scope,
                len(source.pending()), config.reviewer)
    return gr.mount_gradio_app(server, build_app(source), path="", head=HEAD.replace("__KEYS__", json.dumps(KEYS)), css=CSS, theme=theme)


def listen(config: ReviewConfig) -> socket.socket:
    """A socket listening on ``config.host:config.port``, bound before any server runs on it.

    Port 0 has the operating system pick a free port, read back with ``sock.getsockname()[1]``: the port is held from
    the moment it is chosen, so no other process can take it before the server starts.

    Raises:
        OSError: when the address is taken or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    return socket.create_server((config.host, config.port), family=family)


def review_server(folder: str | Path, config: ReviewConfig) -> Any:
    """The uvicorn server of the review app on ``folder``, to ``run(sockets=[listen(config)])``."""
    import uvicorn

    # open browser connections would hold a graceful shutdown (Ctrl+C) forever
    return uvicorn.Server(uvicorn.Config(create_server(folder, config), log_level="warning",
                                         timeout_graceful_shutdown=2))


def serve(folder: str | Path, config: ReviewConfig, announce: Callable[[str], None] | None = None) -> None:
    """Serve the review app on ``config.host:config.port`` (0: a free port) until interrupted.

    Args:
        folder: a validated folder.
        config: reviewer, scope, host and port.
        announce: called with the app's URL (the port actually bound) once it is listening.
    """
    server = review_server(folder, config)  # reads the folder first: a bad folder fails before any port is held
    with listen(config) as sock:
        if announce is not None:
            host = f"[{config.host}]" if ":" in config.host else config.host
            announce(f"http://{host}:{sock.getsockname()[1]}/")
        server.run(sockets=[sock])
