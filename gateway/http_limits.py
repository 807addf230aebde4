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
    """uvicorn's httptools protocol with these limits (``uvicorn.Config(http=...)``)."""

    class LimitedHttpTools(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._in_headers, self._header_bytes, self._refused = True, 0, False
            self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(header_timeout_s, self._too_slow)

        def data_received(self, data: bytes) -> None:
            if self._in_headers and self._header_timer is None:  # the next request on a kept-alive connection
                self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)
            was_in_headers = self._in_headers
            super().data_received(data)
            # Count only chunks after which the headers are still incomplete: a chunk that ends them may carry
            # body bytes too. Memory is bounded by the limit plus one chunk.
            if was_in_headers and self._in_headers and not self._refused:
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(431, f"request headers over {max_header_bytes} bytes")

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._stop_timer()
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

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            self._header_timer = None
            if self._in_headers and not self.transport.is_closing():
                self._refuse(408, f"request headers not complete within {header_timeout_s:g} s")

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, status: int, message: str) -> None:
            self._refused = True
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            body = message.encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, reason, len(body), body))  # fmt: skip
            self.transport.close()
            self._stop_timer()

    return LimitedHttpTools
