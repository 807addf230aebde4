"""Bearer API keys for inference routes (health and metrics stay open)."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from gateway.errors import Unauthorized


class ApiKeyAuth:
    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

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
