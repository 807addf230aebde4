"""Per-client query budgets: a token bucket in rows."""

from __future__ import annotations

import pytest

from gateway.auth import QueryBudget
from gateway.errors import TooManyRequests


def test_bucket_allows_bursts_then_refills() -> None:
    b = QueryBudget(rows_per_s=10, burst=20)
    b.charge("a", 20, now=0.0)
    with pytest.raises(TooManyRequests) as info:
        b.charge("a", 5, now=0.1)  # 1 token back after 0.1 s
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    assert "10 rows/s" in info.value.message
    b.charge("b", 20, now=0.1)  # another client has its own bucket
    b.charge("a", 5, now=0.6)  # 6 tokens after 0.6 s
    with pytest.raises(TooManyRequests) as info:
        b.charge("a", 50, now=100.0)  # never fits: bigger than the burst
    assert "fewer rows" in info.value.message


def test_retry_after_is_the_wait_until_it_fits() -> None:
    b = QueryBudget(rows_per_s=2, burst=10)
    b.charge("a", 10, now=0.0)
    with pytest.raises(TooManyRequests) as info:
        b.charge("a", 8, now=0.0)
    assert info.value.headers["Retry-After"] == "4"


def test_bounded_number_of_clients() -> None:
    b = QueryBudget(rows_per_s=1, burst=1, max_clients=3)
    for c in "abcd":
        b.charge(c, 1, now=0.0)
    b.charge("a", 1, now=0.0)  # "a" was dropped as least recently used: a full bucket again
