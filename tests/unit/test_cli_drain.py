"""The CLI's server: its first exit signal starts the gateway's drain on the serving loop."""

from __future__ import annotations

import asyncio
import signal

import uvicorn

from gateway.__main__ import draining_server


class _State:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.drains = 0

    def begin_drain(self) -> None:
        self.drains += 1


async def test_first_sigterm_starts_the_drain_once() -> None:
    state = _State(asyncio.get_running_loop())
    server = draining_server(uvicorn.Config(app=lambda scope, receive, send: None), state)
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGINT, None)  # a second signal forces the exit; no second drain
    await asyncio.sleep(0)
    assert state.drains == 1 and server.should_exit and server.force_exit
