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

from gateway.errors import (
    ClientDisconnected,
    ClientError,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected; await it only after the body was read (the ASGI server then
    has nothing but the disconnect to deliver)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        if not message.get("body") and not message.get("more_body"):
            await asyncio.Event().wait()  # a server that repeats empty bodies reports no disconnect: never


async def read_json(request: Request, max_bytes: int, *, missing_type_ok: bool = False, timeout_s: float = 30.0) -> Any:
    """Content type (415), size (413) and syntax (400) checks; returns the parsed JSON. ``missing_type_ok``: a
    request without a Content-Type is read as JSON (OIP clients such as tritonclient send none)."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (missing_type_ok and not media):
        raise UnsupportedMediaType(
            f"expected Content-Type: application/json, got {content_type[:60]!r}; "
            "send the body as JSON with that header"
        )
    return parse_json(await read_body(request, max_bytes, timeout_s))


async def read_oip(request: Request, max_bytes: int, timeout_s: float = 30.0) -> tuple[Any, bytes]:
    """An OIP V2 infer body -> (JSON header, binary tensor data). Plain JSON (a missing Content-Type included),
    or the binary tensor extension: ``Inference-Header-Content-Length`` bytes of JSON, then raw tensor bytes."""
    header = request.headers.get("inference-header-content-length")
    if header is None:
        return await read_json(request, max_bytes, missing_type_ok=True, timeout_s=timeout_s), b""
    raw = await read_body(request, max_bytes, timeout_s)
    try:
        n = int(header)
    except ValueError:
        raise ClientError("the Inference-Header-Content-Length header is not an integer") from None
    if not 0 < n <= len(raw):
        raise ClientError(f"Inference-Header-Content-Length is {n} but the body has {len(raw)} bytes")
    return parse_json(raw[:n]), raw[n:]


async def read_body(request: Request, max_bytes: int, timeout_s: float = 30.0) -> bytes:
    """The raw body, with the size (413), deadline (408: ``timeout_s``, GATEWAY_BODY_TIMEOUT_S, so a body trickling
    in holds no connection longer), disconnect (499) and emptiness (400) checks."""
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
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise PayloadTooLarge(f"the body exceeds the limit of {max_bytes} bytes: send fewer rows per "
                                          "request")  # fmt: skip
    except ClientDisconnect:
        raise ClientDisconnected("the client closed the connection before the body was complete") from None
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s (GATEWAY_BODY_TIMEOUT_S)") from None
    if not body:
        raise ClientError("the body is empty; send a JSON object")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"malformed JSON: {exc}") from None
    # NumPy reads a boolean next to numbers as 1.0 or 0.0; refuse it instead, in the fields the routes read
    # numbers from (others are not read). Only bodies that contain a JSON boolean at all are walked, so
    # ordinary requests pay one byte search.
    if b"true" in body or b"false" in body:
        data = [parsed.get(f) for f in _DATA_FIELDS] if isinstance(parsed, dict) else [parsed]
        if any(_mixes_booleans(v) for v in data):
            raise ClientError("an array mixes booleans with numbers; send numbers only (e.g. 1 and 0)")
    return parsed


#: The request fields the routes read numbers from (`/predict`'s rows, OIP's input tensors).
_DATA_FIELDS = ("instances", "inputs")


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


#: OIP V2 input datatypes the gateway accepts, each cast to float32, with their little-endian binary layout.
OIP_INPUT_TYPES = {
    "FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "BOOL": "?",
}  # fmt: skip
#: The infer response's outputs, in order.
OIP_OUTPUTS = ("probabilities", "labels")


def parse_oip_infer(
    body: Any, *, input_name: str, width: int, max_rows: int, binary: bytes = b""
) -> tuple[np.ndarray, Any]:
    """OIP V2 infer request (its JSON, and the binary tensor data after it if any) -> (x[B, D], request id)."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise ClientError('the body must be an OIP V2 request {"inputs": [{"name", "shape", "datatype", "data"}]}')
    inputs = body["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError(f"send exactly one input tensor named {input_name!r}, got {len(inputs)}")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise ClientError(f"unknown input {tensor.get('name')!r}; this model's input is {input_name!r}")
    datatype = tensor.get("datatype")
    if datatype not in OIP_INPUT_TYPES:
        raise ClientError(f"input datatype {datatype!r} is not supported; send one of {sorted(OIP_INPUT_TYPES)} "
                          "(cast to FP32)")  # fmt: skip
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
    params = tensor.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        return _binary_tensor(binary, size, OIP_INPUT_TYPES[datatype], (shape[0], shape[1])), body.get("id")
    if binary:
        raise ClientError("binary data follows the JSON header, but the input has no `binary_data_size` parameter")
    data = tensor.get("data")
    if datatype == "BOOL" and isinstance(data, list):
        data = np.asarray(data, dtype=object)
        if not all(isinstance(v, bool) for v in data.ravel()):
            raise ClientError("a BOOL input's `data` must hold only true and false")
        data = data.astype(np.uint8).tolist()
    if isinstance(data, list) and data and isinstance(data[0], list):
        x = as_matrix(data, width=width, max_rows=max_rows, field="data")
        if x.shape[0] != shape[0]:
            raise ClientError(f"`data` has {x.shape[0]} rows but shape says {shape[0]}")
    else:
        x = as_matrix(data, width=width, max_rows=max_rows, field="data", shape=(shape[0], shape[1]))
    return x, body.get("id")


def _binary_tensor(binary: bytes, size: Any, dtype: str, shape: tuple[int, int]) -> np.ndarray:
    """The binary tensor extension's raw bytes -> validated float32 [B, D]."""
    itemsize = np.dtype(dtype).itemsize
    want = shape[0] * shape[1] * itemsize
    if not isinstance(size, int) or isinstance(size, bool) or size != want or size != len(binary):
        raise ClientError(f"binary_data_size is {size!r} and {len(binary)} bytes follow the header; shape "
                          f"{list(shape)} needs {want}")  # fmt: skip
    if shape[0] == 0:
        raise ClientError("`data` is empty; send at least one row")
    raw = np.frombuffer(binary, dtype=dtype).reshape(shape)
    with np.errstate(over="ignore", invalid="ignore"):
        x = raw.astype(np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise ClientError(f"row {int(np.argmin(finite))} has a non-finite value or one outside the float32 range")
    return np.ascontiguousarray(x)


def oip_requested_outputs(body: dict[str, Any]) -> dict[str, bool]:
    """Which outputs an infer request asked for, each with whether it wants binary data (the extension)."""
    params = body.get("parameters")
    default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    requested = body.get("outputs")
    if requested is None:
        return dict.fromkeys(OIP_OUTPUTS, default)
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested) or not requested:
        raise ClientError('`outputs` must be a non-empty list of {"name": ...} objects')
    wanted: dict[str, bool] = {}
    for o in requested:
        name = o.get("name")
        if name not in OIP_OUTPUTS:
            raise ClientError(f"unknown output {str(name)[:64]!r}; this model returns {list(OIP_OUTPUTS)}")
        p = o.get("parameters")
        wanted[name] = bool(p.get("binary_data", default)) if isinstance(p, dict) else default
    return wanted


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
