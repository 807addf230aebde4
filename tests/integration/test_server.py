"""The CLI over a real socket on 127.0.0.1: the embedded demo, readiness and graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready in time")


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


@pytest.mark.slow
def test_demo_serves_location30_and_shuts_down_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DEMO_CACHE"] = str(tmp_path / "cache")
    env["GATEWAY_METRICS_PORT"] = str(metrics_port := free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--demo", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout_s=300)  # the first start trains the demo bundle (~1 min alone on 2 cores)
        x = np.zeros((3, 446))
        x[:, :40] = 1
        body = post(url + "/predict", {"instances": x.tolist()})
        p = np.array(body["probabilities"])
        assert p.shape == (3, 30) and np.abs(p.sum(1) - 1).max() <= 1e-6
        assert body["labels"] == p.argmax(1).tolist() and body["model"] == "location30-demo"
        meta = json.loads(urllib.request.urlopen(url + "/v2/models/location30-demo").read())
        assert meta["inputs"][0]["shape"] == [-1, 446]
        with pytest.raises(urllib.error.HTTPError) as public:  # clients cannot read per-row metrics
            urllib.request.urlopen(url + "/metrics")
        assert public.value.code == 404
        public.value.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            assert b"gateway_request_duration_seconds_bucket" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete (exit by that signal).
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "CPUExecutionProvider" in out or "CUDAExecutionProvider" in out
    assert "Failed to load library" not in out  # the expected CUDA probe error stays out of the log
    assert "drained and stopped" in out
    assert (tmp_path / "cache").is_dir()


def test_cli_refuses_a_bad_bundle_with_the_fix(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--artifacts", str(tmp_path), "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "manifest.json not found" in proc.stderr


def test_cli_refuses_nothing_to_serve() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "nothing to serve" in proc.stderr
