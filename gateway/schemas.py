"""Request parsing and validation, response bodies.

Bodies are parsed with orjson and checked with numpy rather than per-element pydantic models:
a 446-feature row validates in microseconds. Every failure raises a ``ClientError`` whose
message says what to fix; none echoes the submitted values.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request

from gateway.errors import ClientDisconnected, ClientError, PayloadTooLarge, UnsupportedMediaType


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected; await it only after the body was read (the ASGI server then
    has nothing but the disconnect to deliver)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        if not message.get("body") and not message.get("more_body"):
            await asyncio.Event().wait()  # a server that repeats empty bodies reports no disconnect: never


async def read_json(request: Request, max_bytes: int) -> Any:
    """Content type (415), size (413) and syntax (400) checks; returns the parsed JSON."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"expected Content-Type: application/json, got {content_type[:60]!r}; "
            "send the body as JSON with that header"
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ClientError("the Content-Length header is not an integer") from None
        if size > max_bytes:
            raise PayloadTooLarge(
                f"the body is {size} bytes; the limit is {max_bytes} bytes: send fewer rows per request"
            )
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise PayloadTooLarge(f"the body exceeds the limit of {max_bytes} bytes: send fewer rows per request")
    except ClientDisconnect:
        raise ClientDisconnected("the client closed the connection before the body was complete") from None
    if not body:
        raise ClientError("the body is empty; send a JSON object")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"malformed JSON: {exc}") from None
    # NumPy reads a boolean next to numbers as 1.0 or 0.0; refuse it instead. Only bodies that contain a
    # JSON boolean at all are walked, so ordinary requests pay one byte search.
    if (b"true" in body or b"false" in body) and _mixes_booleans(parsed):
        raise ClientError("an array mixes booleans with numbers; send numbers only (e.g. 1 and 0)")
    return parsed


def _mixes_booleans(value: Any) -> bool:
    """Whether any array in ``value`` holds booleans next to non-booleans."""
    if isinstance(value, dict):
        return any(_mixes_booleans(v) for v in value.values())
    if not isinstance(value, list):
        return False
    if value and isinstance(value[0], list | dict):
        return any(_mixes_booleans(v) for v in value)
    kinds = {isinstance(v, bool) for v in value}
    return kinds == {True, False}


def as_matrix(value: Any, *, width: int, max_rows: int, field: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A JSON array -> validated float32 matrix [B, width].

    ``shape`` (OIP) allows flat row-major data with an explicit [B, D] shape.
    """
    if not isinstance(value, list):
        raise ClientError(f"`{field}` must be a JSON array of rows, each a list of {width} numbers")
    if shape is None and len(value) == 0:
        raise ClientError(f"`{field}` is empty; send 1..{max_rows} rows")
    try:
        arr = np.array(value)
    except (ValueError, TypeError, OverflowError):
        raise ClientError(
            f"`{field}` must be a rectangular array of numbers: rows have different lengths or mix lists and numbers"
        ) from None
    if arr.dtype.kind not in "iuf":
        raise ClientError(f"`{field}` must contain only numbers (no strings, booleans or nulls)")
    if shape is not None:
        if arr.size != shape[0] * shape[1]:
            raise ClientError(f"`{field}` has {arr.size} values but shape {list(shape)} needs {shape[0] * shape[1]}")
        arr = arr.reshape(shape)
    if arr.ndim != 2:
        raise ClientError(f"`{field}` must be a list of rows (a 2-D array), got a {arr.ndim}-D array")
    rows, cols = arr.shape
    if rows == 0:
        raise ClientError(f"`{field}` is empty; send 1..{max_rows} rows")
    if rows > max_rows:
        raise PayloadTooLarge(f"`{field}` has {rows} rows; the limit is {max_rows} per request: split the request")
    if cols != width:
        raise ClientError(
            f"each row of `{field}` must have exactly {width} values (the model's input width), got {cols}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
        x = arr.astype(np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise ClientError(f"row {bad} of `{field}` has a non-finite value or one outside the float32 range")
    return np.ascontiguousarray(x)


def parse_predict(body: Any, *, width: int, max_rows: int) -> np.ndarray:
    if not isinstance(body, dict) or "instances" not in body:
        raise ClientError('the body must be a JSON object {"instances": [[...], ...]}')
    return as_matrix(body["instances"], width=width, max_rows=max_rows, field="instances")


def parse_oip_infer(body: Any, *, input_name: str, width: int, max_rows: int) -> tuple[np.ndarray, Any]:
    """OIP V2 infer request -> (x[B, D], request id or None)."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise ClientError('the body must be an OIP V2 request {"inputs": [{"name", "shape", "datatype", "data"}]}')
    inputs = body["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError(f"send exactly one input tensor named {input_name!r}, got {len(inputs)}")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise ClientError(f"unknown input {tensor.get('name')!r}; this model's input is {input_name!r}")
    if tensor.get("datatype") != "FP32":
        raise ClientError(f"input datatype must be FP32, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ClientError(f"input shape must be [B, {width}] with non-negative integers, got {shape!r}")
    if shape[0] > max_rows:
        raise PayloadTooLarge(f"the input has {shape[0]} rows; the limit is {max_rows} per request: split the request")
    if shape[1] != width:
        raise ClientError(f"input shape must be [B, {width}] (the model's input width), got {shape}")
    data = tensor.get("data")
    if isinstance(data, list) and data and isinstance(data[0], list):
        x = as_matrix(data, width=width, max_rows=max_rows, field="data")
        if x.shape[0] != shape[0]:
            raise ClientError(f"`data` has {x.shape[0]} rows but shape says {shape[0]}")
    else:
        x = as_matrix(data, width=width, max_rows=max_rows, field="data", shape=(shape[0], shape[1]))
    return x, body.get("id")


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
