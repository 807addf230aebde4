"""Request-header limits for the HTTP server: uvicorn's httptools protocol has none of its own.

Without them a client could send a 32 MB header (it was accepted) or hold connections open by sending the
request line a byte at a time (300 such connections were held for 20 s). ``LimitedHttpTools`` refuses headers
larger than ``GATEWAY_MAX_HEADER_BYTES`` with 431 (exactly when they end, and while they stream in once more
than that has arrived, so memory stays bounded by the limit plus one read) and closes connections whose
headers have not arrived within ``GATEWAY_HEADER_TIMEOUT_S`` with 408. The body has its own deadline
(``schemas.read_body``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def limited_protocol(max_header_bytes: int, header_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these limits (``uvicorn.Config(http=...)``).

    The header deadline is checked by one sweep of the server's connections every ``header_timeout_s / 4`` (at
    most 1 s), not by a timer per request: a timer per request cost ~20% of ``defense=none``'s throughput."""
    sweepers: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}

    async def sweep(connections: set[Any]) -> None:
        period = min(header_timeout_s / 4, 1.0)
        while True:
            await asyncio.sleep(period)
            now = asyncio.get_running_loop().time()
            for conn in list(connections):
                since = getattr(conn, "_headers_since", None)
                if since is not None and now - since > header_timeout_s and not conn.transport.is_closing():
                    conn._refuse(408, f"request headers not complete within {header_timeout_s:g} s")

    class LimitedHttpTools(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._in_headers, self._header_bytes, self._refused = True, 0, False
            self._headers_since: float | None = self.loop.time()
            if self.loop not in sweepers or sweepers[self.loop].done():
                sweepers[self.loop] = self.loop.create_task(sweep(self.server_state.connections))

        def data_received(self, data: bytes) -> None:
            if self._in_headers and self._headers_since is None:  # the next request on a kept-alive connection
                self._headers_since = self.loop.time()
            was_in_headers = self._in_headers
            super().data_received(data)
            # Count only chunks after which the headers are still incomplete: a chunk that ends them may carry
            # body bytes too. Memory is bounded by the limit plus one read.
            if was_in_headers and self._in_headers and not self._refused:
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(431, f"request headers over {max_header_bytes} bytes")

        def on_headers_complete(self) -> None:
            self._in_headers, self._headers_since = False, None
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > max_header_bytes:  # headers that arrived in one read: the exact size, before the app runs
                self._refuse(431, f"request headers over {max_header_bytes} bytes")
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._in_headers, self._header_bytes = True, 0

        def _refuse(self, status: int, message: str) -> None:
            self._refused, self._headers_since = True, None
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            body = message.encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, reason, len(body), body))  # fmt: skip
            self.transport.close()

    return LimitedHttpTools
