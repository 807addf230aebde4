"""Per-client query budgets: a token bucket in rows."""

from __future__ import annotations

import ipaddress

import pytest
from starlette.requests import Request

from gateway.auth import client_address, client_id
from gateway.budget import BucketRule, MemoryBudget
from gateway.errors import TooManyRequests


def test_bucket_allows_bursts_then_refills() -> None:
    b = MemoryBudget(BucketRule(rate=10, burst=20))
    b.charge_at("a", 20, now=0.0)
    with pytest.raises(TooManyRequests) as info:
        b.charge_at("a", 5, now=0.1)  # 1 token back after 0.1 s
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    assert "10 rows/s" in info.value.message
    b.charge_at("b", 20, now=0.1)  # another client has its own bucket
    b.charge_at("a", 5, now=0.6)  # 6 tokens after 0.6 s
    with pytest.raises(TooManyRequests) as info:
        b.charge_at("a", 50, now=100.0)  # never fits: bigger than the burst
    assert "fewer rows" in info.value.message


def test_retry_after_is_the_wait_until_it_fits() -> None:
    b = MemoryBudget(BucketRule(rate=2, burst=10))
    b.charge_at("a", 10, now=0.0)
    with pytest.raises(TooManyRequests) as info:
        b.charge_at("a", 8, now=0.0)
    assert info.value.headers["Retry-After"] == "4"


def test_bounded_number_of_clients() -> None:
    b = MemoryBudget(BucketRule(rate=1, burst=1), max_clients=3)
    for c in "abcd":
        b.charge_at(c, 1, now=0.0)
    b.charge_at("a", 1, now=0.0)  # "a" was dropped as least recently used: a full bucket again


def _request(peer: str, headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": raw, "client": (peer, 5000)})


def test_unverified_tokens_never_key_a_budget() -> None:
    """Without configured keys a bearer token is unverified: every token from one address is one client."""
    ids = {client_id(_request("198.51.100.7", {"Authorization": f"Bearer {i}"}), verified_keys=False)
           for i in range(20)}  # fmt: skip
    assert ids == {"addr:198.51.100.7"}
    keyed = {client_id(_request("198.51.100.7", {"Authorization": f"Bearer k{i % 2}"}), verified_keys=True)
             for i in range(4)}  # fmt: skip
    assert len(keyed) == 2 and all(k.startswith("key:") for k in keyed)


def test_forwarded_address_only_from_trusted_proxies() -> None:
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    spoofed = {"X-Forwarded-For": "203.0.113.9"}
    assert client_address(_request("198.51.100.7", spoofed), proxies) == "198.51.100.7"  # not a proxy: ignored
    assert client_address(_request("10.1.2.3", spoofed), proxies) == "203.0.113.9"
    # a client prepends a fake hop; the trusted ingress appended the real one: the right-most untrusted wins
    chain = {"X-Forwarded-For": "1.2.3.4, 203.0.113.9, 10.9.9.9"}
    assert client_address(_request("10.1.2.3", chain), proxies) == "203.0.113.9"
    assert client_address(_request("10.1.2.3", {}), proxies) == "10.1.2.3"
    assert client_address(_request("10.1.2.3", spoofed)) == "10.1.2.3"  # no trusted proxies configured
