"""Per-client query budgets: a token bucket in rows, in this process or shared by every replica through Redis.

Every row is a query to the model. A budget bounds how fast one client can probe it, e.g. with
near-duplicates of a row, which get fresh keyed noise (docs/ALGORITHMS.md §4). Buckets refill at
``rate`` rows/s up to ``burst``; a request that does not fit gets 429 with the seconds until it would.

``memory`` (the default) keeps the buckets in this process: behind N replicas a client gets up to N× its
budget. ``redis`` keeps them in one Redis, updated atomically by a Lua script on Redis's own clock, so the
replicas share one bucket per client. If Redis cannot be reached, the replica charges its own bucket
instead (a budget per replica is weaker, never absent), counts it in ``gateway_budget_backend_errors_total``
and tries Redis again after a second.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gateway.errors import TooManyRequests

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class BucketRule:
    """The arithmetic both backends share."""

    rate: float  # rows per second
    burst: float  # rows at most in the bucket

    def refill(self, tokens: float, elapsed_s: float) -> float:
        return min(self.burst, tokens + max(0.0, elapsed_s) * self.rate)

    def refusal(self, rows: int, tokens: float) -> TooManyRequests:
        """The 429 for ``rows`` that do not fit in ``tokens``: Retry-After is the wait until they would."""
        wait = math.ceil((rows - tokens) / self.rate) if rows <= self.burst else None
        return TooManyRequests(
            f"over this client's query budget ({self.rate:g} rows/s, bursts of {self.burst:g}); "
            + (f"retry in {wait} s" if wait is not None else "send fewer rows per request"),
            retry_after_s=max(1, wait or 1),
        )


class Budget(Protocol):
    async def charge(self, client: str, rows: int) -> None:
        """Take ``rows`` from the client's bucket, or raise 429."""

    async def close(self) -> None: ...


class MemoryBudget:
    """Buckets in this process. At most ``max_clients`` are kept (least recently used dropped; a dropped client
    starts again with a full bucket)."""

    def __init__(self, rule: BucketRule, *, max_clients: int = 100_000) -> None:
        self.rule = rule
        self.max_clients = max_clients
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()  # tokens, time

    def charge_at(self, client: str, rows: int, now: float) -> None:
        tokens, last = self._buckets.pop(client, (self.rule.burst, now))
        tokens = self.rule.refill(tokens, now - last)
        admitted = rows <= tokens
        self._buckets[client] = (tokens - rows if admitted else tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        if not admitted:
            raise self.rule.refusal(rows, tokens)

    async def charge(self, client: str, rows: int) -> None:
        self.charge_at(client, rows, time.monotonic())

    async def close(self) -> None:
        return None


# KEYS: the charged clients' buckets; ARGV: rate, burst, then each charge's rows. Charges run in order (one
# client twice sees its first charge), atomically. Returns {admitted (0/1), tokens after the refill} per charge.
# Redis's clock (TIME) serves every replica, so their clocks need not agree. A bucket expires once it would be
# full again, so idle clients cost no memory.
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local rows = tonumber(ARGV[i + 2])
  local held = redis.call('HMGET', key, 'tokens', 'time')
  local tokens = tonumber(held[1]) or burst
  local last = tonumber(held[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
  local admitted, left = 0, tokens
  if rows <= tokens then
    admitted, left = 1, tokens - rows
  end
  redis.call('HSET', key, 'tokens', string.format('%.17g', left), 'time', string.format('%.17g', now))
  redis.call('PEXPIRE', key, math.ceil((burst - left) / rate * 1000) + 1000)
  out[#out + 1] = admitted
  out[#out + 1] = string.format('%.17g', tokens)
end
return out
"""


class _Unreachable(Exception):
    """Redis did not answer a charge (the charge falls back to the replica's own bucket)."""


class RedisBudget:
    """One bucket per client in Redis, shared by every replica that uses the same URL and prefix.

    Charges are sent one script call at a time: those that arrive while a call is out go together in the next
    (one round trip and one client-side call for many requests under load; alone, a charge goes at once)."""

    #: after a Redis error, charge the local bucket for this long before trying Redis again
    RETRY_AFTER_S = 1.0

    def __init__(
        self, rule: BucketRule, url: str, *, prefix: str, timeout_s: float, on_error: Callable[[], object] | None = None
    ) -> None:
        import redis.asyncio as aioredis

        self.rule = rule
        self.prefix = prefix
        self.local = MemoryBudget(rule)
        self._on_error = on_error  # e.g. a counter's inc
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._take = self._client.register_script(_TAKE)
        self._down_until = 0.0
        self._pending: list[tuple[str, int, asyncio.Future[tuple[bool, float]]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def charge(self, client: str, rows: int) -> None:
        if time.monotonic() >= self._down_until:
            future = asyncio.get_running_loop().create_future()
            self._pending.append((self.prefix + client, rows, future))
            if self._sender is None or self._sender.done():
                self._sender = asyncio.create_task(self._send())
            try:
                admitted, tokens = await future
            except _Unreachable:
                pass
            else:
                if not admitted:
                    raise self.rule.refusal(rows, tokens)
                return
        self.local.charge_at(client, rows, time.monotonic())

    async def _send(self) -> None:
        """Send what is pending, one call at a time, until nothing is."""
        while self._pending:
            batch, self._pending = self._pending, []
            keys, rows = [k for k, _, _ in batch], [r for _, r, _ in batch]
            answers: list[tuple[bool, float] | None] = [None] * len(batch)  # None: Redis did not answer
            try:
                flat = await self._take(keys=keys, args=[self.rule.rate, self.rule.burst, *rows])
                answers = [(bool(int(flat[2 * i])), float(flat[2 * i + 1])) for i in range(len(batch))]
            except Exception as exc:  # any Redis failure: the replicas' own buckets, never no budget
                self._failed(exc)
            for (_, _, future), answer in zip(batch, answers, strict=True):
                if future.done():  # its request was cancelled (the client left)
                    continue
                if answer is None:
                    future.set_exception(_Unreachable())
                else:
                    future.set_result(answer)

    def _failed(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:  # one line per outage second, not per request
            log.warning("query budgets: Redis unreachable (%s); charging this replica's own buckets for %g s",
                        type(exc).__name__, self.RETRY_AFTER_S)  # fmt: skip
        self._down_until = time.monotonic() + self.RETRY_AFTER_S
        if self._on_error is not None:
            self._on_error()

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except Exception as exc:  # unreachable, refused, timed out: not ready to share
            self._failed(exc)
            return False

    async def close(self) -> None:
        await self._client.aclose()

    def describe(self) -> str:
        kw = self._client.connection_pool.connection_kwargs
        return f"Redis at {kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}, prefix {self.prefix!r}"


def make_budget(settings: GatewaySettings, on_error: Callable[[], object] | None = None) -> Budget | None:
    """The configured backend, or None when budgets are off."""
    if settings.query_budget_rows_per_s is None:
        return None
    rule = BucketRule(settings.query_budget_rows_per_s, float(settings.query_budget_burst))
    if settings.budget_backend == "memory":
        return MemoryBudget(rule)
    assert settings.budget_redis_url is not None  # the settings' validator checked it
    return RedisBudget(rule, settings.budget_redis_url.get_secret_value(), prefix=settings.budget_redis_prefix,
                       timeout_s=settings.budget_redis_timeout_s, on_error=on_error)  # fmt: skip
