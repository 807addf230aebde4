"""A fake KServe/Triton (OIP V2) or plain JSON model server on 127.0.0.1 with switchable faults, for the upstream
proxy tests and the fault-injection suite."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from tests.conftest import FakeRunner

W = FakeRunner().W  # the fake upstream computes logits = x @ W


class Upstream:
    """A fake KServe/Triton (OIP V2) or plain JSON model server with switchable behaviour."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.fail_first = 0
        self.calls = 0
        self.delay_s = 0.0
        self.trickle = False  # answer headers, then one byte every 0.1 s (for at most 5 s)
        self.headers: list[dict[str, str]] = []  # the tracing headers of every call
        self.lock = threading.Lock()

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        with self.lock:
            self.calls += 1
            calls = self.calls
        if self.delay_s:
            time.sleep(self.delay_s)
        if calls <= self.fail_first:
            return 503, b'{"error": "warming up"}'
        if self.mode == "500":
            return 500, b'{"error": "boom"}'
        if self.mode == "400":
            return 400, b'{"error": "bad request"}'
        if self.mode == "not_json":
            return 200, b"<html>oops</html>"
        if path.startswith("/v2/models/"):
            x = np.asarray(body["inputs"][0]["data"], dtype=np.float32).reshape(body["inputs"][0]["shape"])
        else:
            x = np.asarray(body["instances"], dtype=np.float32)
        z = x @ W
        if self.mode == "wrong_shape":
            z = z[:, :-1]
        if self.mode == "nan":
            z[0, 0] = np.nan
        z = z.astype(np.float64)
        if self.mode == "huge":
            z[0, 0] = 1e300  # finite in JSON, outside float32

        def value(v: float) -> Any:
            return None if np.isnan(v) else (str(float(v)) if self.mode == "strings" else float(v))

        if path.startswith("/v2/models/"):
            name = "logits" if self.mode != "missing" else "other"
            out = {"outputs": [{"name": name, "shape": list(z.shape), "datatype": "FP32",
                                "data": [value(v) for v in z.ravel()]}]}  # fmt: skip
        else:
            out = {"predictions": [[value(v) for v in r] for r in z]}
        return 200, json.dumps(out).encode()


@contextmanager
def fake_upstream() -> Iterator[tuple[Upstream, str]]:
    """The fake server and its base URL; shut down on exit."""
    fake = Upstream()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.headers.append({k: v for k in ("X-Request-ID", "traceparent") if (v := self.headers.get(k))})
            if fake.trickle:
                with fake.lock:
                    fake.calls += 1
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(50):
                    try:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.1)
                return
            status, payload = fake.answer(self.path, body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the gateway gave up on a slow answer and closed the connection
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
