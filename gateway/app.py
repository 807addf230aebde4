"""App factory and lifespan.

Startup: bundle (sha256-verified) → runner (provider read back) → defense → pipeline → batch
queue → warm-up → ready. Shutdown: not ready (readiness 503) → queue drained → runner closed.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import __version__
from gateway.artifacts import Bundle, Manifest, load_bundle
from gateway.auth import ApiKeyAuth
from gateway.batching import BatchQueue
from gateway.budget import Budget, RedisBudget, make_budget
from gateway.defenses import Defense, create_defense
from gateway.defenses.keyed import RowKeyer, key_context
from gateway.errors import BundleError, GatewayError
from gateway.logs import incoming_request_id, request_id
from gateway.metrics import GatewayMetrics, start_metrics_server
from gateway.openapi import openapi_document
from gateway.pipeline import Pipeline
from gateway.runner import CUDA, ModelRunner, OnnxRunner
from gateway.schemas import dumps
from gateway.settings import GatewaySettings
from gateway.threads import apply_torch_threads

log = logging.getLogger("gateway")

RunnerFactory = Callable[[Bundle, GatewaySettings], ModelRunner]


@dataclass
class GatewayState:
    settings: GatewaySettings
    metrics: GatewayMetrics
    auth: ApiKeyAuth
    budget: Budget | None = None
    bundle: Bundle | None = None
    runner: ModelRunner | None = None
    defense: Defense | None = None
    batcher: BatchQueue | None = None
    ready: bool = False
    draining: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # the serving loop, for signal handlers
    probing: asyncio.Future[bool] | None = None  # the upstream probe in flight (proxy mode), shared by checks
    openapi: bytes | None = None  # GET /openapi.json, built once the bundle is loaded

    async def probe_upstream(self) -> bool:
        """Proxy mode: one short probe of the upstream (<= 1 s), shared by every readiness check meanwhile."""
        probe = getattr(self.runner, "probe", None)
        if probe is None:
            return True
        if self.probing is None or self.probing.done():
            self.probing = asyncio.ensure_future(asyncio.to_thread(probe))
        return await asyncio.shield(self.probing)

    def begin_drain(self) -> None:
        """SIGTERM, on the serving loop: not ready from now on, and requests still queued after
        ``GATEWAY_DRAIN_TIMEOUT_S`` get 503 with Retry-After (an ingress retries them on another replica), so
        every accepted request has its answer before the server's graceful-shutdown limit."""
        if self.draining:
            return
        self.draining = True
        self.metrics.ready.set(0)
        log.info("draining: not ready; queued requests not started within %.0f s get 503",
                 self.settings.drain_timeout_s)  # fmt: skip
        if self.batcher is not None:
            self.batcher.refuse_after(self.settings.drain_timeout_s)

    @property
    def upstream_ok(self) -> bool:
        """Proxy mode: the upstream's last call (a batch's after its retries, or a probe's) succeeded."""
        return getattr(self.runner, "failing_since", None) is None

    @property
    def gpu_ok(self) -> bool:
        return not self.settings.require_gpu or (self.runner is not None and self.runner.provider == CUDA)

    def stuck_s(self) -> float | None:
        """How long a stuck batch call has run (past GATEWAY_BATCH_TIMEOUT_S), else None."""
        return self.batcher.stuck_s if self.batcher is not None else None

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "the gateway is draining for shutdown"
        if not self.ready:
            return "the model and defense are still loading"
        if (stuck := self.stuck_s()) is not None:
            return f"the model has not answered a batch for {stuck:.0f} s (GATEWAY_BATCH_TIMEOUT_S); see the log"
        if not self.upstream_ok:
            return "the upstream model server is not answering correctly (proxy mode); see the gateway log"
        if not self.gpu_ok:
            provider = self.runner.provider if self.runner else "none"
            return f"GATEWAY_REQUIRE_GPU=true but ONNX Runtime runs on {provider}; check the CUDA libraries and driver"
        return None


def default_runner(bundle: Bundle, settings: GatewaySettings) -> ModelRunner:
    m = bundle.manifest
    if settings.upstream_url:
        from gateway.upstream import UpstreamRunner

        return UpstreamRunner(settings, m)
    threads = settings.threads()
    return OnnxRunner(
        bundle.model_path,
        input_name=m.input.name,
        output_name=m.output.name,
        intra_op_threads=threads.ort_intra_op_threads,
        allow_spinning=threads.ort_spinning,
    )


def _build(state: GatewayState, runner_factory: RunnerFactory) -> Pipeline:
    settings = state.settings
    assert settings.artifacts is not None
    bundle = load_bundle(settings.artifacts)
    manifest = bundle.manifest
    apply_torch_threads(settings.threads())
    runner = runner_factory(bundle, settings)
    device = torch.device("cuda") if runner.provider == CUDA and torch.cuda.is_available() else torch.device("cpu")
    defense = create_defense(settings.defense, bundle, dict(settings.defense_params), device)
    keyer = None
    if defense.randomized:
        if settings.uses_default_secret() and not settings.development:
            raise BundleError(
                "GATEWAY_NOISE_SECRET is unset or the development default: set a random secret shared by all "
                "replicas (e.g. `openssl rand -hex 32`), or use --demo for local experiments"
            )
        context = key_context(manifest.version, defense.name, defense.params())
        keyer = RowKeyer(settings.noise_secret.get_secret_value().encode(), context)
    state.bundle, state.runner, state.defense = bundle, runner, defense
    state.openapi = dumps(openapi_document(manifest, max_rows=settings.max_batch_rows))
    return Pipeline(
        runner,
        defense,
        classes=manifest.output.classes,
        output_kind=settings.upstream_output_kind or manifest.output.kind,
        on_defense_error=settings.on_defense_error,
        metrics=state.metrics,
        keyer=keyer,
        device=device,
        features=manifest.input.width,
        noise_key=settings.noise_key,
        noise_key_grid=settings.noise_key_grid,
    )


def _warm_up(pipeline: Pipeline, width: int, max_batch: int) -> None:
    """Run the shapes the batcher will produce once, on throwaway metrics."""
    probe = copy.copy(pipeline)
    probe.metrics = GatewayMetrics(max_batch_size=max_batch)
    for b in sorted({1, max_batch}):
        probe(np.zeros((b, width), dtype=np.float32))


class _RequestTimer:
    """Pure ASGI middleware: request latency by route template and status (bounded labels), and the request id
    (the client's ``X-Request-ID`` if plain, else a fresh one), echoed on the response and set for log lines."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, templates: dict[Any, str]) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates  # endpoint -> path template (Starlette routes leave no scope["route"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = incoming_request_id(given)
        token = request_id.set(rid)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            request_id.reset(token)
            route = scope.get("route")
            template = getattr(route, "path", None) or self.templates.get(scope.get("endpoint"), "unmatched")
            self.metrics.request_duration.labels(template, str(status)).observe(time.perf_counter() - start)


def log_defense_quality(manifest: Manifest, name: str, params: dict[str, Any]) -> None:
    """State what the offline job measured for the served defense, loudly when it is weak or unmeasured."""
    entry = manifest.defenses.get(name)
    if name == "none":
        log.warning("defense 'none': every confidence vector leaves undefended, as the model computed it; choose "
                    "one with GATEWAY_DEFENSE (README, \"Defenses\": rank_template first)")  # fmt: skip
        return
    if entry is None:
        return
    q = entry.quality
    audited = next((r for r in manifest.self_audit if r.defense == name), None)
    if q is None and audited is not None:  # no member classifier to gate (rank_template, hamp): the self-audit
        floor = "unknown" if audited.label_only_floor is None else f"{audited.label_only_floor:.3f}"
        log.info("defense %r: the offline self-audit's best confidence attack on held-out rows reached %.3f (%s; "
                 "label-only floor %s)", name, audited.balanced_accuracy, audited.best_attack, floor)  # fmt: skip
        return
    if q is None:
        log.warning("defense %r: the bundle records no quality measurement (written before the quality gate); "
                    "rebuild it to learn whether the defense perturbs anything", name)  # fmt: skip
        return
    flagged = "n/a" if q.perturbed_share_flagged is None else f"{q.perturbed_share_flagged:.0%}"
    changed = {k: v for k, v in params.items() if k in q.params and q.params[k] != v}
    log.info("defense %r measured offline on %d+%d held-out rows at %s: classifier balanced accuracy %.3f, perturbs "
             "%.0f%% of rows and %s of the rows it calls members, mean L1 %.4f", name, q.held_out_members,
             q.held_out_nonmembers, q.params, q.classifier_balanced_accuracy, 100 * q.perturbed_share, flagged,
             q.mean_l1)  # fmt: skip
    if changed:
        log.warning("defense %r is served with %s, not the measured values; the measurement may not hold", name,
                    changed)  # fmt: skip
    if q.problems:
        log.warning("defense %r FAILED its quality gate and was written with --allow-weak-defense: %s", name,
                    "; ".join(q.problems))  # fmt: skip


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class GatewayRuntime:
    """What runs between startup and shutdown: pipeline, batch queue, the optional metrics server."""

    def __init__(self, state: GatewayState, runner_factory: RunnerFactory) -> None:
        self.state = state
        self.runner_factory = runner_factory
        self._metrics_server: Any = None

    async def start(self) -> None:
        """Bundle → runner → defense → pipeline → warm-up → batch queue → ready."""
        state, settings = self.state, self.state.settings
        state.loop = asyncio.get_running_loop()
        pipeline = await asyncio.to_thread(_build, state, self.runner_factory)
        self._announce(pipeline)
        # Proxy mode: a short probe first (the upstream may start after us, or hang), so the port is bound within
        # a second whatever the upstream does; readiness probes it again until it answers.
        if not await state.probe_upstream():
            log.warning("the upstream model server does not answer yet; not ready until it does (warm-up skipped)")
        else:
            try:
                await asyncio.to_thread(_warm_up, pipeline, _width(state), settings.max_batch_size)
            except GatewayError as exc:  # the runner marks the upstream failing: readiness probes it again
                log.warning("warm-up through the upstream failed (%s); not ready until it answers",
                            type(exc).__name__)  # fmt: skip
        state.batcher = BatchQueue(pipeline, max_batch_size=settings.max_batch_size,
                                   max_delay_s=settings.max_queue_delay_ms / 1000,
                                   max_queue_rows=settings.max_queue_rows, metrics=state.metrics,
                                   fill_wait=settings.batch_fill_wait,
                                   quantum_s=self._timing_quantum_s(),
                                   batch_timeout_s=settings.batch_timeout_s)  # fmt: skip
        state.batcher.start()
        await self._announce_budget()
        if settings.metrics_port:
            token = settings.metrics_token_bytes()
            try:
                self._metrics_server = start_metrics_server(state.metrics.registry, settings.host,
                                                            settings.metrics_port, token)  # fmt: skip
            except OSError as exc:
                raise BundleError(f"cannot serve /metrics on {settings.host}:{settings.metrics_port} ({exc.strerror}); "
                                  "set GATEWAY_METRICS_PORT to a free port, or 0 for none") from None  # fmt: skip
            log.info("metrics on %s:%d/metrics%s; the public port %s", settings.host, settings.metrics_port,
                     " (bearer token)" if token else "",
                     "serves them too" if settings.metrics_public else "does not serve them")  # fmt: skip
        # Everything allocated so far (torch, ORT, the app) lives until shutdown. Move it out of the
        # collector's reach: otherwise every full collection walks torch's object graph and stalls
        # the event loop for ~80 ms (measured: p99 85 ms -> 9 ms under load, docs/BENCHMARKS.md).
        gc.collect()
        gc.freeze()
        state.ready = True
        state.metrics.ready.set(1 if state.not_ready_reason() is None else 0)

    def _timing_quantum_s(self) -> float:
        """GATEWAY_TIMING_QUANTUM_MS, else the defense's own; logged."""
        state = self.state
        ms = state.settings.timing_quantum_ms
        quantum = getattr(state.defense, "timing_quantum_s", 0.0) if ms is None else ms / 1000
        name = state.defense.name if state.defense is not None else "?"
        if quantum:
            log.info("timing: answers leave at multiples of %g ms after their batch starts (defense %r's work varies "
                     "by row; GATEWAY_TIMING_QUANTUM_MS)", quantum * 1000, name)  # fmt: skip
        return float(quantum)

    async def _announce_budget(self) -> None:
        budget, s = self.state.budget, self.state.settings
        if budget is None:
            return
        where = "this replica's own buckets"
        if isinstance(budget, RedisBudget):
            where = "shared through " + budget.describe()
            if not await budget.ping():
                log.warning("query budgets: Redis does not answer yet; own buckets until it answers")
        log.info("query budgets: %g rows/s, bursts of %d, %s", s.query_budget_rows_per_s, s.query_budget_burst, where)

    def _announce(self, pipeline: Pipeline) -> None:
        """Metrics' info series and the startup log lines: what is served, where, with which defense."""
        state = self.state
        assert state.bundle is not None and state.runner is not None and state.defense is not None
        m, runner, defense = state.bundle.manifest, state.runner, state.defense
        state.metrics.model_info.labels(m.name, m.version, runner.provider).set(1)
        state.metrics.init_defense(defense.name)
        state.metrics.queue_depth.set(0)
        log.info("serving %s %s (%d features -> %d classes, %s) on %s with defense %r %s", m.name, m.version,
                 m.input.width, m.output.classes, m.output.kind, runner.provider, defense.name,
                 defense.params())  # fmt: skip
        log_defense_quality(m, defense.name, defense.params())
        log.info("threads: %s", state.settings.threads().describe())
        if defense.randomized:
            by_output = f"clean output on a {pipeline.noise_key_grid:g} grid (near-duplicates share a draw)"
            log.info("randomness keyed per row by its %s",
                     by_output if pipeline.noise_key == "output" else "exact input bytes")  # fmt: skip
        if state.settings.require_gpu and not state.gpu_ok:
            log.error("GATEWAY_REQUIRE_GPU=true but the provider is %s: readiness stays 503", runner.provider)

    async def stop(self) -> None:
        """Not ready (readiness 503) → queue drained → metrics server and runner closed."""
        state = self.state
        state.ready = False
        state.draining = True
        state.metrics.ready.set(0)
        if state.batcher is not None:
            await state.batcher.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if state.runner is not None:
            state.runner.close()
        if state.budget is not None:
            await state.budget.close()
        gc.unfreeze()
        log.info("drained and stopped")


def _width(state: GatewayState) -> int:
    assert state.bundle is not None
    return state.bundle.manifest.input.width


def create_app(settings: GatewaySettings, *, runner_factory: RunnerFactory = default_runner) -> FastAPI:
    metrics = GatewayMetrics(max_batch_size=settings.max_batch_size)
    budget = make_budget(settings, on_error=metrics.budget_backend_errors.inc)
    state = GatewayState(settings=settings, metrics=metrics, auth=ApiKeyAuth(settings.all_api_keys()), budget=budget)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = GatewayRuntime(state, runner_factory)
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="mi-gateway",
        version=__version__,
        lifespan=lifespan,
        # Routes are plain Starlette routes (see api.py), so FastAPI's generated docs would be empty;
        # the contract lives in the README.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = state

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            metrics_route = " and /metrics" if settings.metrics_public else " (metrics are on their own port)"
            message = (
                f"no route {request.url.path[:64]}; the routes are /predict, /v2/models/{{model}}/infer, "
                f"/healthz, /readyz{metrics_route}"
            )
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
        return error_response(500, "internal error; see the gateway log")

    from gateway import api, oip

    routes = [*api.routes, *oip.routes] + ([api.metrics_route] if settings.metrics_public else [])
    app.router.routes.extend(routes)
    app.add_middleware(_RequestTimer, metrics=metrics, templates={r.endpoint: r.path for r in routes})
    return app
