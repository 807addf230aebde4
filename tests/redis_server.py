"""A throwaway Redis on 127.0.0.1 (Debian's `redis-server`), for the shared-budget test and bench/budget.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: CI sets this so a missing redis-server fails the run instead of skipping the test (.ci/run installs it).
REQUIRED = os.environ.get("MI_GATEWAY_REQUIRE_REDIS") == "1"


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@contextmanager
def redis_server(port: int = 0) -> Iterator[str]:
    """Start redis-server (no persistence, loopback only) and yield its URL; stopped on exit.
    ``port`` 0 picks a free one; pass a port to restart a server on the same address."""
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as work:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", work, "--protected-mode", "yes"]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(port, proc)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _wait_for(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode} (port {port} taken?)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"redis-server did not answer on port {port} within {timeout_s:g} s")
