"""``python -m gateway serve``: settings → ``uvicorn.run(create_app(settings))``.

CLI flags override ``GATEWAY_*`` variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from gateway.app import create_app
    from gateway.errors import BundleError
    from gateway.logs import configure_logging
    from gateway.settings import GatewaySettings

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "artifacts": args.artifacts,
            "host": args.host,
            "port": args.port,
            "defense": args.defense,
        }.items()
        if v is not None
    }
    if args.demo:
        overrides["demo"] = True
    try:
        settings = GatewaySettings(**overrides)
    except ValidationError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if settings.demo and settings.artifacts is None:
        from gateway.demo import ensure_demo_bundle

        try:
            settings = settings.model_copy(update={"artifacts": ensure_demo_bundle(settings.demo_cache)})
        except BundleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    app = create_app(settings)
    draining_server(server_config(app, settings), app.state.gateway).run()
    return 0


def server_config(app: Any, settings: Any) -> Any:
    """uvicorn's configuration for the gateway: limits on request headers, the drain's graceful limit."""
    import uvicorn

    from gateway.http_limits import limited_protocol

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers propagate to the root handler (text or JSON lines)
        access_log=settings.access_log,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s + DRAIN_MARGIN_S),
        http=limited_protocol(settings.max_header_bytes, settings.header_timeout_s),
    )


#: Seconds between the drain deadline (queued requests get 503) and the server's hard limit: the batch running
#: at the deadline finishes and its answers go out.
DRAIN_MARGIN_S = 5.0


def draining_server(config: Any, state: Any) -> Any:
    """A uvicorn server whose first SIGTERM (or SIGINT) also starts the gateway's drain on the serving loop
    (``GatewayState.begin_drain``): readiness turns false at once, and queued work meets the drain deadline.
    uvicorn alone would only tell the app at lifespan shutdown, after its own graceful limit has cut
    connections."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit and state.loop is not None:
                state.loop.call_soon_threadsafe(state.begin_drain)
            super().handle_exit(sig, frame)

    return Server(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Membership-inference-defending prediction gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve a bundle (or the embedded demo) over HTTP")
    p.add_argument("--artifacts", help="artifact bundle directory (GATEWAY_ARTIFACTS)")
    p.add_argument("--demo", action="store_true", help="serve the embedded Location30 demo, built on first use")
    p.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    p.add_argument("--defense", help="defense name (GATEWAY_DEFENSE, default none)")
    p.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
