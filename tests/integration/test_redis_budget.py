"""Query budgets shared by replicas through a real Redis (Debian's redis-server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.budget import BucketRule, RedisBudget
from gateway.errors import TooManyRequests
from tests.conftest import make_settings, metric_value, rows, serving
from tests.redis_server import REQUIRED, redis_binary, redis_server

pytestmark = pytest.mark.skipif(
    redis_binary() is None and not REQUIRED, reason="redis-server is not installed (apt-get install redis-server)"
)
PREFIX = "test:budget:"


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def _replica(url: str, rule: BucketRule, errors: list[int] | None = None) -> RedisBudget:
    on_error = (lambda: errors.append(1)) if errors is not None else None
    return RedisBudget(rule, url, prefix=PREFIX, timeout_s=0.25, on_error=on_error)


async def test_replicas_share_one_bucket(redis_url: str) -> None:
    rule = BucketRule(rate=0.001, burst=10)
    a, b = _replica(redis_url, rule), _replica(redis_url, rule)
    await a.charge("addr:198.51.100.7", 6)
    await b.charge("addr:198.51.100.7", 4)  # the same bucket: 10 rows in all
    with pytest.raises(TooManyRequests) as info:
        await a.charge("addr:198.51.100.7", 1)
    assert info.value.status == 429 and "0.001 rows/s" in info.value.message
    await b.charge("addr:203.0.113.9", 10)  # another client: its own bucket
    await a.close()
    await b.close()


async def test_concurrent_charges_go_together_and_stay_exact(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Charges that arrive while a call is out share the next call; each is still admitted or refused in order."""
    budget = _replica(redis_url, BucketRule(rate=0.001, burst=10))
    calls: list[int] = []
    take = budget._take

    async def counted(keys: list[str], args: list[object]) -> object:
        calls.append(len(keys))
        return await take(keys=keys, args=args)

    monkeypatch.setattr(budget, "_take", counted)
    results = await asyncio.gather(*(budget.charge("c", 1) for _ in range(25)), return_exceptions=True)
    assert [r is None for r in results] == [True] * 10 + [False] * 15  # the first 10 fit, in arrival order
    assert all(isinstance(r, TooManyRequests) for r in results[10:])
    assert sum(calls) == 25 and len(calls) < 25  # coalesced
    await budget.close()


async def test_same_arithmetic_as_the_process_bucket(redis_url: str) -> None:
    """Retry-After is the wait until the rows fit, as MemoryBudget's (tests/unit/test_budget.py)."""
    budget = _replica(redis_url, BucketRule(rate=2, burst=10))
    await budget.charge("c", 10)
    with pytest.raises(TooManyRequests) as info:
        await budget.charge("c", 8)
    assert info.value.headers["Retry-After"] == "4"
    with pytest.raises(TooManyRequests) as info:
        await budget.charge("c", 11)  # never fits
    assert "fewer rows" in info.value.message
    await budget.close()


async def test_idle_buckets_expire(redis_url: str) -> None:
    budget = _replica(redis_url, BucketRule(rate=5, burst=10))
    await budget.charge("idle", 10)
    ttl_ms = redis.Redis.from_url(redis_url).pttl(PREFIX + "idle")
    assert 1000 < ttl_ms <= 10 / 5 * 1000 + 1000  # gone once the bucket would be full again (+1 s)
    await budget.close()


async def test_an_outage_falls_back_to_the_replicas_own_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis down: each replica charges its own bucket (weaker, never absent), counts it, and tries Redis again."""
    monkeypatch.setattr(RedisBudget, "RETRY_AFTER_S", 0.2)
    errors: list[int] = []
    with redis_server() as url:
        budget = _replica(url, BucketRule(rate=0.001, burst=4), errors)
        await budget.charge("c", 4)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    await budget.charge("c", 3)  # Redis is gone: the local bucket (full) admits...
    with pytest.raises(TooManyRequests):
        await budget.charge("c", 2)  # ...up to its own burst, still refusing beyond it
    assert errors == [1]  # one failed call; the next charges went straight to the local bucket
    await asyncio.sleep(0.25)
    with redis_server(port):  # back (empty: no persistence)
        await budget.charge("c", 4)  # Redis again: a fresh shared bucket, not the local one (1 row left)
        assert redis.Redis.from_url(url).exists(PREFIX + "c")
    await budget.close()


async def test_two_gateways_share_a_clients_budget(tiny_bundle: Path, redis_url: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    shared = {"query_budget_rows_per_s": 0.001, "query_budget_burst": 4, "budget_backend": "redis",
              "budget_redis_url": redis_url, "budget_redis_prefix": PREFIX}  # fmt: skip
    caplog.set_level(logging.INFO, logger="gateway")
    async with serving(make_settings(tiny_bundle, **shared)) as (one, _), \
               serving(make_settings(tiny_bundle, **shared)) as (two, _):  # fmt: skip
        assert (await one.post("/predict", json={"instances": rows(3)})).status_code == 200
        r = await two.post("/predict", json={"instances": rows(3)})  # 3 + 3 > 4: the second replica refuses
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert (await two.post("/predict", json={"instances": rows(1)})).status_code == 200
        assert metric_value((await one.get("/metrics")).text, "gateway_budget_backend_errors_total") == 0
    assert any("shared through Redis at 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_redis_backend_needs_a_url(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="GATEWAY_BUDGET_REDIS_URL"):
        make_settings(tiny_bundle, budget_backend="redis")
