"""Open Inference Protocol V2: health, server and model metadata, infer (JSON, and the binary tensor data
extension that Triton's clients use by default)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import __version__
from gateway.api import _json, charge_budget, check_readiness, serving_state, upstream_trace
from gateway.errors import ModelNotFound
from gateway.schemas import client_gone, dumps, oip_requested_outputs, parse_oip_infer, read_oip

if TYPE_CHECKING:
    from gateway.app import GatewayState


def _check_model(state: GatewayState, model: str, version: str | None = None) -> None:
    manifest = state.bundle.manifest if state.bundle is not None else None
    if manifest is None or model != manifest.name:
        served = manifest.name if manifest else "none yet"
        raise ModelNotFound(f"unknown model {_short(model)}; this gateway serves {served!r}")
    if version is not None and version != manifest.version:
        raise ModelNotFound(f"unknown version {_short(version)} of {_short(model)}; the served version is "
                            f"{manifest.version!r}")  # fmt: skip


def _short(name: str, limit: int = 64) -> str:
    """A client-supplied name for an error message: quoted, and cut so a 404 cannot echo kilobytes back."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"… ({len(name)} characters)"


async def server_metadata(request: Request) -> Response:
    return _json({"name": "mi-gateway", "version": __version__, "extensions": ["binary_tensor_data"]})


async def live(request: Request) -> Response:
    """OIP liveness: false (503) while a model+defense call is stuck, as /healthz."""
    stuck = request.app.state.gateway.stuck_s() is not None
    return _json({"live": not stuck}, status=503 if stuck else 200)


async def ready(request: Request) -> Response:
    ok = await check_readiness(request.app.state.gateway) is None
    return _json({"ready": ok}, status=200 if ok else 503)


async def _metadata(request: Request, model: str, version: str | None) -> Response:
    state = request.app.state.gateway
    _check_model(state, model, version)
    m = state.bundle.manifest
    return _json(
        {
            "name": m.name,
            "versions": [m.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": m.input.name, "datatype": "FP32", "shape": [-1, m.input.width]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, m.output.classes]},
                {"name": "labels", "datatype": "INT64", "shape": [-1]},
            ],
            "parameters": {"defense": state.defense.name},
        }
    )


async def _model_ready(request: Request, model: str, version: str | None) -> Response:
    state = request.app.state.gateway
    _check_model(state, model, version)
    ok = await check_readiness(state) is None
    return _json({"name": model, "ready": ok}, status=200 if ok else 503)


async def _infer(request: Request, model: str, version: str | None) -> Response:
    s = serving_state(request)
    _check_model(s.state, model, version)
    m, settings = s.manifest, s.state.settings
    body, binary = await read_oip(request, settings.max_body_bytes, settings.body_timeout_s)
    x, request_id = parse_oip_infer(body, input_name=m.input.name, width=m.input.width,
                                    max_rows=settings.max_batch_rows, binary=binary)  # fmt: skip
    wanted = oip_requested_outputs(body)
    await charge_budget(s.state, request, x.shape[0])
    out = await s.batcher.submit(x, gone=lambda: client_gone(request), trace=upstream_trace(s, request))
    B, C = out.probabilities.shape
    # name -> (datatype, its little-endian binary layout, shape, values); probabilities stay float64 in JSON (no
    # precision lost) and are FP32 in binary
    tensors: dict[str, tuple[str, str, list[int], np.ndarray]] = {
        "probabilities": ("FP32", "<f4", [B, C], out.probabilities),
        "labels": ("INT64", "<i8", [B], out.labels),
    }
    response: dict[str, Any] = {"model_name": m.name, "model_version": m.version, "outputs": [],
                                "parameters": {"defense": s.defense.name}}  # fmt: skip
    if request_id is not None:
        response["id"] = request_id
    blobs = []
    for name, as_binary in wanted.items():
        datatype, layout, shape, values = tensors[name]
        entry: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
        if as_binary:  # the binary tensor data extension: raw little-endian bytes after the JSON header
            blobs.append(values.astype(layout).tobytes())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = values.ravel()
        response["outputs"].append(entry)
    if not blobs:
        return _json(response)
    header = dumps(response)
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip


Handler = Callable[[Request, str, str | None], Awaitable[Response]]


def _with_params(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        params = request.path_params
        return await handler(request, params["model"], params.get("version"))

    return endpoint


routes = [
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", live, methods=["GET"]),
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/v2/models/{model}", _with_params(_metadata), methods=["GET"]),
    Route("/v2/models/{model}/versions/{version}", _with_params(_metadata), methods=["GET"]),
    Route("/v2/models/{model}/ready", _with_params(_model_ready), methods=["GET"]),
    Route("/v2/models/{model}/versions/{version}/ready", _with_params(_model_ready), methods=["GET"]),
    Route("/v2/models/{model}/infer", _with_params(_infer), methods=["POST"]),
    Route("/v2/models/{model}/versions/{version}/infer", _with_params(_infer), methods=["POST"]),
]
