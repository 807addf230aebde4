"""Bearer API keys for inference routes (health and metrics stay open), and whom a query budget charges."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from starlette.requests import Request

from gateway.errors import Unauthorized


def bearer_token(authorization: str) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    scheme, _, token = authorization.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token.strip() else None


def matches_any(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    """Constant-time membership: compares against every key, so timing does not reveal which prefix matched."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


def bearer_matches(authorization: str, token: bytes | None) -> bool:
    """An ``Authorization`` header value against one token (no token configured: always)."""
    if token is None:
        return True
    presented = bearer_token(authorization)
    return presented is not None and matches_any(presented, (token,))


class ApiKeyAuth:
    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._keys = keys

    @property
    def required(self) -> bool:
        """Whether inference routes need a key (then ``check`` has verified it before any budget)."""
        return bool(self._keys)

    def check(self, request: Request) -> None:
        if not self._keys:
            return
        presented = bearer_token(request.headers.get("authorization", ""))
        if presented is None:
            raise Unauthorized("this route needs an API key: send `Authorization: Bearer <key>`")
        if not matches_any(presented, self._keys):
            raise Unauthorized("the API key was not recognised; check `Authorization: Bearer <key>`")


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _trusted(host: str, proxies: Networks) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in proxies)


def client_address(request: Request, trusted_proxies: Networks = ()) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the right-most address in
    X-Forwarded-For that is not itself a trusted proxy (the one the first trusted hop saw). A client can
    prepend anything to that header, so nothing left of the first untrusted hop is believed."""
    peer = request.client.host if request.client else "unknown"
    if not _trusted(peer, trusted_proxies):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted_proxies):
            return hop
    return hops[0] if hops else peer


def client_id(request: Request, *, verified_keys: bool, trusted_proxies: Networks = ()) -> str:
    """The budget's key: a digest of the bearer key when keys are configured (so the key was verified
    before this runs), else the client's address. An unverified token is never a key: a fresh random
    token per request would otherwise get a fresh budget."""
    header = request.headers.get("authorization", "")
    if verified_keys and header.lower().startswith("bearer "):
        return "key:" + hashlib.sha256(header[7:].strip().encode()).hexdigest()[:16]
    return "addr:" + client_address(request, trusted_proxies)
