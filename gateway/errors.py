"""The gateway's exception tree and its one mapping to HTTP.

::

    GatewayError (500)                      server fault, message safe to show
    ├── ClientError (400)                   the request is wrong; never a 5xx
    │   ├── Unauthorized (401)              missing or wrong API key
    │   ├── ModelNotFound (404)             unknown model name (OIP routes)
    │   ├── PayloadTooLarge (413)           body bytes or row count over the limit
    │   ├── UnsupportedMediaType (415)      not application/json
    │   └── TooManyRequests (429)           queue full; carries Retry-After
    ├── ServiceUnavailable (503)            not ready, draining, or a defended row fell back
    │   └── DefenseRejected (503)           GATEWAY_ON_DEFENSE_ERROR=reject hit a row of the request
    ├── UpstreamError (502)                 the model backend failed
    └── UpstreamTimeout (504)               the model backend timed out

Every message is written for the client and must name the fix. No message may contain a
confidence vector (raw or defended): errors are built from shapes, counts and names only.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ClientError(GatewayError):
    status = 400


class Unauthorized(ClientError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ClientDisconnected(ClientError):
    """The client closed the connection before its body arrived: nothing to answer (nginx's 499, for metrics)."""

    status = 499


class RequestTimeout(ClientError):
    """The body did not arrive within GATEWAY_BODY_TIMEOUT_S; the connection closes (the rest of the body would
    be read as the next request)."""

    status = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class InputOutOfRange(ClientError):
    """Finite inputs for which the model's output is not finite (e.g. every feature ±3e38)."""

    status = 422


class ModelNotFound(ClientError):
    status = 404


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMediaType(ClientError):
    status = 415


class TooManyRequests(ClientError):
    status = 429

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ServiceUnavailable(GatewayError):
    status = 503


class DefenseRejected(ServiceUnavailable):
    pass


class UpstreamError(GatewayError):
    status = 502


class UpstreamTimeout(GatewayError):
    status = 504


class BundleError(RuntimeError):
    """The artifact bundle cannot be served; raised at startup, never mapped to HTTP."""
