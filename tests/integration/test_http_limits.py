"""Request-header and body limits of the served gateway (``gateway serve``'s uvicorn configuration), over real
sockets: a huge header is a 431, headers or a body that trickle in are a 408, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

from tests.conftest import FakeRunner, live_gateway, make_settings, rows


def exchange(url: str, data: bytes, *, then_wait_s: float = 0.0) -> tuple[bytes, float]:
    """Send raw bytes, optionally wait, read until the server closes; -> (answer, seconds until it closed)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        time.sleep(then_wait_s)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer, time.monotonic() - start


def test_header_size_and_slow_requests_are_refused(tiny_bundle: Path) -> None:
    settings = make_settings(tiny_bundle, max_header_bytes=4096, header_timeout_s=0.5, body_timeout_s=0.5)
    with live_gateway(settings, FakeRunner()) as url:
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8_000 + b"\r\n\r\n"
        answer, _ = exchange(url, big)
        assert answer.startswith(b"HTTP/1.1 431")
        try:  # a header far over the limit is cut off while it streams in (the peer may see a reset first)
            answer, _ = exchange(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000)
            assert answer.startswith(b"HTTP/1.1 431")
        except (ConnectionResetError, BrokenPipeError):
            pass
        answer, took = exchange(url, b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never end
        assert answer.startswith(b"HTTP/1.1 408") and took < 3
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        answer, took = exchange(url, head + b'{"instances": ')  # the body never ends
        assert b" 408 " in answer.split(b"\r\n")[0] and b"GATEWAY_BODY_TIMEOUT_S" in answer and took < 3
        body = json.dumps({"instances": rows(2)}).encode()
        request = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:  # ordinary requests are unaffected
            assert r.status == 200
