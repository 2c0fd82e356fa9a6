"""A real OpenAI-compatible server for the tests: `transformers serve` on a tiny local VLM (no network), started on a
port it picks itself and stopped by pid; and a proxy in front of it that injects faults and counts requests."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVER_WAIT_S = 180


@contextmanager
def served(model: str, log: Path) -> Iterator[str]:
    """`transformers serve model` on port 0 (the port is read back from its log); yields its ``/v1`` URL.

    Raises:
        RuntimeError: when it does not start within `SERVER_WAIT_S` (its log's tail says why).
    """
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--host",
                                 "127.0.0.1", "--port", "0"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline, url = time.monotonic() + SERVER_WAIT_S, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            found = [line for line in log.read_text().splitlines() if "Uvicorn running on http://" in line]
            url = found[0].split("running on ")[1].split()[0] + "/v1" if found else None
        if url is None:
            raise RuntimeError(f"transformers serve did not start in {SERVER_WAIT_S} s (exit {proc.poll()}):\n"
                               + log.read_text()[-2000:])
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class FaultProxy:
    """A local HTTP proxy in front of the server: answers the first requests with scripted faults (``429``,
    ``500``, ``hang``, ``drop``, or ``fail`` for every request), forwards the rest, and counts what it sees."""

    def __init__(self, upstream: str, faults: list[str] = (), hang_s: float = 6.0) -> None:
        import httpx

        self.upstream, self.faults, self.hang_s = upstream.rstrip("/"), list(faults), hang_s
        self.requests, self.bodies, self.lock = 0, [], threading.Lock()
        self.http = httpx.Client(timeout=60)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._forward(self, None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy._forward(self, body)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client killed mid-request is no error here
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)  # the port comes from the OS
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _forward(self, handler, body):
        with self.lock:
            if body is not None:
                self.requests += 1
                self.bodies.append(hashlib.sha256(body).hexdigest())
            fault = self.faults.pop(0) if self.faults and body is not None and self.faults[0] != "fail" else (
                "fail" if self.faults[:1] == ["fail"] and body is not None else None)
        if fault in ("429", "500", "fail"):
            handler.send_response(429 if fault == "429" else 500)
            if fault == "429":
                handler.send_header("Retry-After", "1")
            handler.send_header("Content-Type", "application/json")
            payload = json.dumps({"error": {"message": f"injected {fault}"}}).encode()
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        if fault == "hang":
            time.sleep(self.hang_s)
        if fault in ("hang", "drop"):
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        path = handler.path.removeprefix("/v1")
        upstream = self.http.request(handler.command, self.upstream + path, content=body,
                                     headers={"Content-Type": "application/json"})
        handler.send_response(upstream.status_code)
        handler.send_header("Content-Type", upstream.headers.get("content-type", "application/json"))
        handler.send_header("Content-Length", str(len(upstream.content)))
        handler.end_headers()
        handler.wfile.write(upstream.content)

    def close(self):
        self.server.shutdown()
        self.http.close()
