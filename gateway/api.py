"""``POST /predict``, health, readiness and metrics. Handlers stay thin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth import bearer_matches
from gateway.errors import ServiceUnavailable
from gateway.logs import RequestTrace, request_id
from gateway.schemas import client_gone, dumps, parse_predict, read_json

if TYPE_CHECKING:
    from gateway.app import GatewayState
    from gateway.artifacts import Manifest
    from gateway.batching import BatchQueue
    from gateway.defenses import Defense


def _json(obj: object, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


async def check_readiness(state: GatewayState) -> str | None:
    """Why the gateway is not ready (None when it is), for every readiness route.

    In proxy mode the upstream is down once its last call failed (a batch's, after the retries, or a probe's),
    and while it is, each check probes it again (one short probe shared by concurrent checks, so a check
    answers within a second). The ``gateway_ready`` gauge follows the answer.
    """
    if state.ready and not state.upstream_ok:
        await state.probe_upstream()  # a success clears the runner's failing mark
    reason: str | None = state.not_ready_reason()
    state.metrics.ready.set(0 if reason else 1)
    return reason


async def charge_budget(state: GatewayState, request: Request, rows: int) -> None:
    """429 when the client is over its query budget (validated rows only: bad requests cost nothing)."""
    if state.budget is not None:
        from gateway.auth import client_id

        client = client_id(request, verified_keys=state.auth.required, trusted_proxies=state.settings.proxy_networks)
        await state.budget.charge(client, rows)


@dataclass(frozen=True)
class Serving:
    """What an inference route needs, all loaded."""

    state: GatewayState
    manifest: Manifest
    batcher: BatchQueue
    defense: Defense


def serving_state(request: Request) -> Serving:
    """Auth first (401 before anything else), then readiness (503)."""
    state: GatewayState = request.app.state.gateway
    state.auth.check(request)
    if state.batcher is None or state.bundle is None or state.defense is None or state.draining:
        raise ServiceUnavailable("the gateway is not ready (loading or draining); retry shortly",
                                 headers={"Retry-After": "1"})  # fmt: skip
    return Serving(state, state.bundle.manifest, state.batcher, state.defense)


def upstream_trace(s: Serving, request: Request) -> RequestTrace | None:
    """The request's id and ``traceparent``, when the runner forwards them to an upstream model server."""
    if not getattr(s.state.runner, "forwards_headers", False):
        return None
    return RequestTrace(request_id.get(), request.headers.get("traceparent"))


async def predict(request: Request) -> Response:
    s = serving_state(request)
    manifest, settings = s.manifest, s.state.settings
    body = await read_json(request, settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    x = parse_predict(body, width=manifest.input.width, max_rows=settings.max_batch_rows)
    await charge_budget(s.state, request, x.shape[0])
    out = await s.batcher.submit(x, gone=lambda: client_gone(request), trace=upstream_trace(s, request))
    return _json(
        {
            "probabilities": out.probabilities,
            "labels": out.labels,
            "model": manifest.name,
            "model_version": manifest.version,
            "defense": s.defense.name,
        }
    )


async def healthz(request: Request) -> Response:
    """Liveness: alive, unless a model+defense call is stuck (then a restart is the cure: 503)."""
    stuck = request.app.state.gateway.stuck_s()
    if stuck is not None:
        return _json({"status": "stuck", "error": f"a model call has not returned for {stuck:.0f} s"}, status=503)
    return _json({"status": "alive"})


async def readyz(request: Request) -> Response:
    state = request.app.state.gateway
    reason = await check_readiness(state)
    if reason is not None:
        return _json({"error": reason}, status=503)
    return _json({"status": "ready", "provider": state.runner.provider, "defense": state.defense.name})


async def openapi(request: Request) -> Response:
    """The OpenAPI document (gateway/openapi.py), for clients and fuzzers; 503 until the bundle is loaded."""
    document = request.app.state.gateway.openapi
    if document is None:
        return _json({"error": "the model and defense are still loading"}, status=503)
    return Response(document, media_type="application/json")


async def metrics(request: Request) -> Response:
    """Only routed with ``GATEWAY_METRICS_PUBLIC=true``: per-row distortion metrics tell a client what happened
    to its query, so by default they are served on the metrics port only (docs/API.md, Metrics)."""
    state = request.app.state.gateway
    if not bearer_matches(request.headers.get("authorization", ""), state.settings.metrics_token_bytes()):
        return _json({"error": "/metrics needs Authorization: Bearer <GATEWAY_METRICS_TOKEN>"}, status=401)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# Plain Starlette routes: the handlers take a raw Request, so FastAPI's dependency machinery would
# only add per-request overhead on the hot path (measured in docs/BENCHMARKS.md).
routes = [
    Route("/predict", predict, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
metrics_route = Route("/metrics", metrics, methods=["GET"])
