"""Upstream proxy mode against a fake model server on 127.0.0.1: normal, slow, failing, malformed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import CLASSES, make_settings, metric_value, rows, serving, softmax
from tests.upstream_fake import Upstream, W, fake_upstream


@pytest.fixture
def upstream() -> Iterator[tuple[Upstream, str]]:
    with fake_upstream() as served:
        yield served


@pytest.mark.parametrize("protocol", ["oip", "json"])
async def test_proxy_defends_what_the_upstream_returns(tiny_bundle: Path, upstream: Any, protocol: str) -> None:
    _, url = upstream
    settings = make_settings(tiny_bundle, upstream_url=url, upstream_protocol=protocol, defense="rounding",
                             max_queue_delay_ms=5)  # fmt: skip
    async with serving(settings) as (client, app):
        assert app.state.gateway.runner.provider == "upstream"
        x = rows(3)
        r = await client.post("/predict", json={"instances": x})
        assert r.status_code == 200, r.text
        p = np.array(r.json()["probabilities"])
        clean = softmax(np.array(x, np.float32) @ W)
        assert r.json()["labels"] == clean.argmax(1).tolist()
        assert np.abs(p - clean).max() <= 0.05 and np.abs(p - clean).max() > 0  # defended (rounded), not raw
        text = (await client.get("/metrics")).text
        assert metric_value(text, "gateway_model_info", provider="upstream") == 1
        assert (await client.get("/readyz")).status_code == 200


async def test_retries_then_succeeds(tiny_bundle: Path, upstream: Any) -> None:
    fake, url = upstream
    async with serving(make_settings(tiny_bundle, upstream_url=url, upstream_retries=2)) as (client, _):
        before = fake.calls
        fake.fail_first = before + 2  # the next two calls answer 503
        r = await client.post("/predict", json={"instances": rows(1)})
        assert r.status_code == 200, r.text
        assert fake.calls - before == 3  # two retries, then success


@pytest.mark.parametrize(
    ("mode", "status", "fragment"),
    [
        ("500", 502, "answered 500"),
        ("400", 502, "answered 400"),
        ("not_json", 502, "not JSON"),
        ("wrong_shape", 502, f"expected [1, {CLASSES}]"),
        ("nan", 502, "non-finite"),
        ("huge", 502, "float32 range"),
        ("strings", 502, "non-numeric"),
        ("missing", 502, "no usable"),
    ],
)
async def test_upstream_faults_fail_closed(
    tiny_bundle: Path, upstream: Any, mode: str, status: int, fragment: str
) -> None:
    fake, url = upstream
    settings = make_settings(tiny_bundle, upstream_url=url, upstream_retries=1, upstream_output_field="logits")
    async with serving(settings) as (client, _):
        fake.mode = mode
        r = await client.post("/predict", json={"instances": rows(1)})
        assert r.status_code == status and fragment in r.json()["error"], r.text
        assert set(r.json()) == {"error"}  # no vector of any kind in an error
        fake.mode = "ok"
        assert (await client.post("/predict", json={"instances": rows(1)})).status_code == 200


async def test_slow_upstream_is_504_after_bounded_retries(tiny_bundle: Path, upstream: Any) -> None:
    fake, url = upstream
    settings = make_settings(tiny_bundle, upstream_url=url, upstream_timeout_s=0.2, upstream_retries=1)
    async with serving(settings) as (client, _):
        fake.delay_s = 0.6
        calls = fake.calls
        start = time.perf_counter()
        r = await client.post("/predict", json={"instances": rows(1)})
        assert r.status_code == 504 and "GATEWAY_UPSTREAM_TIMEOUT_S" in r.json()["error"]
        assert fake.calls - calls == 2 and time.perf_counter() - start < 3  # two attempts, then give up
        fake.delay_s = 0.0


async def test_a_trickling_upstream_meets_the_attempt_and_overall_deadlines(tiny_bundle: Path, upstream: Any) -> None:
    """An upstream sending its body a byte at a time never times out a read: the per-attempt deadline cuts each
    attempt off, and the overall deadline stops the retries, so the batch worker is held ~1 s, not 5 s × 3."""
    fake, url = upstream
    settings = make_settings(tiny_bundle, upstream_url=url, upstream_timeout_s=0.4, upstream_retries=5,
                             upstream_deadline_s=1.0)  # fmt: skip
    async with serving(settings) as (client, _):
        fake.trickle = True
        calls = fake.calls
        start = time.perf_counter()
        r = await client.post("/predict", json={"instances": rows(1)})
        took = time.perf_counter() - start
        assert r.status_code == 504 and "GATEWAY_UPSTREAM_DEADLINE_S" in r.json()["error"]
        assert took < 2.0 and 2 <= fake.calls - calls <= 3, (took, fake.calls - calls)
        fake.trickle = False
        assert (await client.post("/predict", json={"instances": rows(1)})).status_code == 200


async def test_unreachable_upstream_is_not_ready_until_it_answers(tiny_bundle: Path, upstream: Any) -> None:
    fake, url = upstream
    fake.mode = "500"
    async with serving(make_settings(tiny_bundle, upstream_url=url, upstream_retries=0)) as (client, _):
        r = await client.get("/readyz")
        assert r.status_code == 503 and "upstream" in r.json()["error"]
        assert (await client.get("/healthz")).status_code == 200  # liveness does not depend on the upstream
        assert (await client.get("/v2/models/tiny/ready")).status_code == 503
        fake.mode = "ok"
        assert (await client.get("/v2/models/tiny/ready")).status_code == 200  # every ready route re-probes
        assert (await client.get("/readyz")).status_code == 200
    dead = make_settings(tiny_bundle, upstream_url="http://127.0.0.1:9", upstream_retries=0, upstream_timeout_s=0.5)
    async with serving(dead) as (client, _):
        r = await client.post("/predict", json={"instances": rows(1)})
        assert r.status_code == 502 and "GATEWAY_UPSTREAM_URL" in r.json()["error"]


async def test_readiness_follows_the_upstreams_recent_failures(tiny_bundle: Path, upstream: Any) -> None:
    """Ready at first; not ready once a batch's upstream call failed (after its retries), and each probe answers
    within a second; ready again once the upstream answers."""
    fake, url = upstream
    async with serving(make_settings(tiny_bundle, upstream_url=url, upstream_retries=0)) as (client, _):
        assert (await client.get("/readyz")).status_code == 200
        fake.mode = "500"
        assert (await client.post("/predict", json={"instances": rows(1)})).status_code == 502
        start = time.perf_counter()
        r = await client.get("/readyz")
        assert r.status_code == 503 and "upstream" in r.json()["error"] and time.perf_counter() - start < 1
        fake.mode = "ok"
        assert (await client.get("/readyz")).status_code == 200


async def test_a_hanging_upstream_delays_neither_startup_nor_probes(tiny_bundle: Path, upstream: Any) -> None:
    fake, url = upstream
    fake.delay_s = 3.0
    start = time.perf_counter()
    settings = make_settings(tiny_bundle, upstream_url=url, upstream_timeout_s=5.0, upstream_retries=2)
    async with serving(settings) as (client, _):
        assert time.perf_counter() - start < 2.5  # up and bound within a probe's budget (plus the app's startup)
        probe = time.perf_counter()
        r = await client.get("/readyz")
        assert r.status_code == 503 and time.perf_counter() - probe < 1.5
        fake.delay_s = 0.0


async def test_request_ids_and_trace_context_reach_the_upstream(tiny_bundle: Path, upstream: Any) -> None:
    """A batch of one request forwards its X-Request-ID and traceparent; a batch of several gets its own id
    (logged with the ids it carries) and no traceparent, since it has no single parent span."""
    fake, url = upstream
    settings = make_settings(tiny_bundle, upstream_url=url, max_queue_delay_ms=50)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with serving(settings) as (client, _):
        r = await client.post("/predict", json={"instances": rows(1)},
                              headers={"X-Request-ID": "req-1", "traceparent": traceparent})  # fmt: skip
        assert r.status_code == 200 and fake.headers[-1] == {"X-Request-ID": "req-1", "traceparent": traceparent}
        calls = len(fake.headers)
        both = await asyncio.gather(*(client.post("/predict", json={"instances": rows(1)},
                                                  headers={"X-Request-ID": f"req-{i}", "traceparent": traceparent})
                                      for i in (2, 3)))  # fmt: skip
        assert [b.status_code for b in both] == [200, 200] and len(fake.headers) == calls + 1
        assert fake.headers[-1]["X-Request-ID"].startswith("batch-") and "traceparent" not in fake.headers[-1]
