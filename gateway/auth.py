"""Bearer API keys for inference routes (health and metrics stay open), and per-client query budgets."""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import time

from starlette.requests import Request

from gateway.errors import TooManyRequests, Unauthorized


class ApiKeyAuth:
    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._keys = keys

    def check(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this route needs an API key: send `Authorization: Bearer <key>`")
        presented = token.strip().encode()
        # Compare against every key so timing does not reveal which prefix matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise Unauthorized("the API key was not recognised; check `Authorization: Bearer <key>`")


def client_id(request: Request) -> str:
    """The budget's key: a digest of the bearer key when one is sent, else the client's address."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return "key:" + hashlib.sha256(header[7:].strip().encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


class QueryBudget:
    """A token bucket per client, counted in rows (every row is a query to the model).

    Bounds how fast one client can probe the model, e.g. with near-duplicates of a row, which get
    fresh keyed noise (docs/ALGORITHMS.md §4). Buckets refill at ``rows_per_s`` up to ``burst``; a request
    that does not fit gets 429 with the seconds until it would. At most ``max_clients`` buckets are
    kept (least recently used dropped; a dropped client starts again with a full bucket).
    """

    def __init__(self, rows_per_s: float, burst: int, *, max_clients: int = 100_000) -> None:
        self.rate = rows_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def charge(self, client: str, rows: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if rows > tokens:
            self._buckets[client] = (tokens, now)
            wait = math.ceil((min(rows, self.burst) - tokens) / self.rate) if rows <= self.burst else None
            raise TooManyRequests(
                f"over this client's query budget ({self.rate:g} rows/s, bursts of {self.burst:g}); "
                + (f"retry in {wait} s" if wait is not None else "send fewer rows per request"),
                retry_after_s=max(1, wait or 1),
            )
        self._buckets[client] = (tokens - rows, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
