"""Fault injection through real HTTP: every fault gets its documented status (docs/API.md, "Errors"), the gateway
recovers, and no response body or log line (at debug level, uvicorn's included) carries a confidence vector.

Faults: the model raises, returns NaN, hangs; the defense raises; the upstream model server goes down, is slow,
answers garbage, trickles its answer; the queue is full; a client disconnects while its request is queued."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.defenses import register_defense, unregister_defense
from tests.conftest import FakeRunner, RaisingDefense, live_gateway, make_settings, metric_value, rows, softmax
from tests.leaks import vector_leaks
from tests.upstream_fake import Upstream, W, fake_upstream


class HangingRunner(FakeRunner):
    """Blocks inside the model call on rows whose first feature is HANG until ``release`` is set."""

    HANG = 555.0

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def run(self, x: np.ndarray) -> np.ndarray:
        if (x[:, 0] == self.HANG).any():
            self.release.wait(timeout=30)
        return super().run(x)


@dataclass
class Seen:
    """What the suite read back that must not carry a vector (error bodies; a 200 carries the released one), and the
    raw vectors of every row it sent."""

    texts: list[str] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)

    def post(self, client: httpx.Client, x: list[list[float]], **kw: Any) -> httpx.Response:
        with np.errstate(all="ignore"):
            self.raw.append(softmax(np.asarray(x, dtype=np.float32) @ W))
        r = client.post("/predict", json={"instances": x}, **kw)
        if r.status_code != 200:
            self.texts.append(r.text)
        return r


@pytest.fixture
def seen(caplog: pytest.LogCaptureFixture) -> Iterator[Seen]:
    """After the test: no vector in any error body or log line."""
    caplog.set_level(logging.DEBUG)
    s = Seen()
    yield s
    raw = np.concatenate([r[np.isfinite(r).all(1)] for r in s.raw]) if s.raw else None
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert not vector_leaks("\n".join(s.texts) + logs, raw)


@contextmanager
def gateway(bundle: Path, runner: Any = None, **overrides: Any) -> Iterator[httpx.Client]:
    with live_gateway(make_settings(bundle, **overrides), runner, log_level="debug") as url, \
            httpx.Client(base_url=url, timeout=30) as client:  # fmt: skip
        yield client


def _recovers(client: httpx.Client, seen: Seen) -> None:
    assert seen.post(client, rows(2, seed=11)).status_code == 200


# --- the model ------------------------------------------------------------------------------------------------
def test_the_model_raises_500(tiny_bundle: Path, seen: Seen) -> None:
    with gateway(tiny_bundle, FakeRunner()) as client:
        x = rows(2)
        x[0][0] = FakeRunner.POISON
        r = seen.post(client, x)
        assert r.status_code == 500 and set(r.json()) == {"error"} and "model failed" in r.json()["error"]
        _recovers(client, seen)


def test_a_nan_from_the_model_is_422(tiny_bundle: Path, seen: Seen) -> None:
    with gateway(tiny_bundle, FakeRunner()) as client:
        x = rows(2)
        x[1][0] = FakeRunner.NAN_ROW
        r = seen.post(client, x)
        assert r.status_code == 422 and "out of the range" in r.json()["error"]
        _recovers(client, seen)


def test_a_hanging_model_is_503_and_fails_liveness_until_it_returns(tiny_bundle: Path, seen: Seen) -> None:
    runner = HangingRunner()
    with gateway(tiny_bundle, runner, batch_timeout_s=0.3) as client:
        x = rows(1)
        x[0][0] = HangingRunner.HANG
        r = seen.post(client, x)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "has not answered" in r.json()["error"]
        assert client.get("/healthz").status_code == 503 and client.get("/v2/health/live").status_code == 503
        assert client.get("/readyz").status_code == 503
        assert seen.post(client, rows(1)).status_code == 503  # new work is refused at once, not queued
        runner.release.set()
        deadline = time.monotonic() + 5
        while client.get("/healthz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/readyz").status_code == 200
        _recovers(client, seen)


# --- the defense ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("on_error", "status"), [("reject", 503), ("label_only", 200)])
def test_the_defense_raises(tiny_bundle: Path, seen: Seen, on_error: str, status: int) -> None:
    register_defense(RaisingDefense)
    try:
        with gateway(tiny_bundle, FakeRunner(), defense="test_raises", on_defense_error=on_error) as client:
            r = seen.post(client, rows(3))
            assert r.status_code == status
            if status == 200:  # the one-hot label, never the raw vector
                p = np.asarray(r.json()["probabilities"])
                assert set(p.ravel().tolist()) <= {0.0, 1.0} and (p.sum(1) == 1).all()
            else:
                assert set(r.json()) == {"error"} and "withheld" in r.json()["error"]
    finally:
        unregister_defense("test_raises")


# --- the upstream model server --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "status"),
    [("down", 502), ("slow", 504), ("garbage", 502), ("trickle", 504)],
)
def test_upstream_faults(tiny_bundle: Path, seen: Seen, fault: str, status: int) -> None:
    faults: dict[str, Callable[[Upstream], None]] = {
        "slow": lambda f: setattr(f, "delay_s", 1.0),
        "garbage": lambda f: setattr(f, "mode", "not_json"),
        "trickle": lambda f: setattr(f, "trickle", True),
    }
    with fake_upstream() as (fake, url):
        if fault == "down":  # a port that was just free: nothing listens
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{s.getsockname()[1]}"
        settings = {"upstream_url": url, "upstream_timeout_s": 0.3, "upstream_retries": 1}
        with gateway(tiny_bundle, None, **settings) as client:
            if fault != "down":
                assert seen.post(client, rows(1)).status_code == 200
                faults[fault](fake)
            r = seen.post(client, rows(2))
            assert r.status_code == status and set(r.json()) == {"error"}, r.text
            assert client.get("/readyz").status_code == 503  # a failed upstream call: not ready until it answers
            if fault != "down":
                fake.mode, fake.delay_s, fake.trickle = "ok", 0.0, False
                _recovers(client, seen)


def test_an_upstream_that_goes_down_is_502_then_not_ready(tiny_bundle: Path, seen: Seen) -> None:
    with fake_upstream() as (fake, url), gateway(tiny_bundle, None, upstream_url=url, upstream_timeout_s=0.3,
                                                 upstream_retries=0) as client:  # fmt: skip
        assert seen.post(client, rows(1)).status_code == 200
        fake.mode = "500"  # then its process dies: answers 500
        r = seen.post(client, rows(2))
        assert r.status_code == 502 and "answered 500" in r.json()["error"]
        fake.mode = "ok"


# --- the queue and the clients --------------------------------------------------------------------------------
def test_a_full_queue_is_429_with_retry_after(tiny_bundle: Path, seen: Seen) -> None:
    with gateway(tiny_bundle, FakeRunner(delay_s=0.3), max_queue_rows=2, max_batch_size=1) as client, \
            ThreadPoolExecutor(8) as pool:  # fmt: skip
        answers = list(pool.map(lambda i: seen.post(client, rows(1, seed=i)), range(8)))
        codes = sorted(r.status_code for r in answers)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        assert all(r.headers["retry-after"] == "1" for r in answers if r.status_code == 429)
        _recovers(client, seen)


def test_a_client_that_disconnects_while_queued_is_dropped_and_counted(
    tiny_bundle: Path, seen: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    runner = FakeRunner(delay_s=0.5)
    with gateway(tiny_bundle, runner, max_batch_size=1) as client:
        warm = len(runner.batches)
        busy = ThreadPoolExecutor(1).submit(seen.post, client, rows(1, seed=1))  # occupies the worker
        time.sleep(0.1)
        body = b'{"instances": [[' + b", ".join(b"0.5" for _ in range(8)) + b"]]}"
        host, port = client.base_url.host, client.base_url.port
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
            time.sleep(0.1)  # queued behind the busy batch; then the client leaves
        assert busy.result().status_code == 200
        time.sleep(0.6)
        text = client.get("/metrics").text
        assert metric_value(text, "gateway_request_duration_seconds_count", route="/predict", status="499") == 1
        assert runner.batches[warm:] == [1]  # the abandoned row never reached the model
        _recovers(client, seen)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
