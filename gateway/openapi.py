"""The OpenAPI 3.0 document of the HTTP API (docs/API.md), built once at startup for the served bundle.

Served at ``GET /openapi.json`` so clients can discover the API and fuzzers can run (CI runs schemathesis
against it: tests/integration/test_openapi.py). The routes are plain Starlette handlers, so nothing generates
this from them: the document is written here, next to the error table it mirrors, and the test keeps the two
honest. The binary tensor data extension of OIP infer is not expressible in JSON Schema; it is described in
the operation's text.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.artifacts import Manifest
from gateway.schemas import OIP_OUTPUTS

#: An input value: any number FP32 can hold (larger ones are a 400).
_FEATURE = {"type": "number", "minimum": -3.4028234663852886e38, "maximum": 3.4028234663852886e38}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
#: Statuses every inference route may answer besides 200 (docs/API.md, "Errors").
_INFERENCE_ERRORS = {
    "400": "malformed JSON, wrong shape or width, non-numbers, non-finite values",
    "401": "an API key is required and missing or wrong",
    "404": "unknown model or version (OIP)",
    "408": "the body did not arrive within GATEWAY_BODY_TIMEOUT_S",
    "413": "too many rows or too large a body",
    "415": "a Content-Type other than application/json",
    "422": "finite inputs the model's output is not finite for (out of its range)",
    "429": "the queue is full, or the client is over its query budget (Retry-After)",
    "503": "not ready, draining, or the defense could not protect a row (Retry-After while draining)",
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(codes: dict[str, str]) -> dict[str, Any]:
    return {code: _json(_ERROR, text) for code, text in codes.items()}


def _matrix(width: int, max_rows: int) -> dict[str, Any]:
    row = {"type": "array", "items": _FEATURE, "minItems": width, "maxItems": width}
    return {"type": "array", "items": row, "minItems": 1, "maxItems": max_rows}


def openapi_document(manifest: Manifest, *, max_rows: int) -> dict[str, Any]:
    """The document for this bundle: its model name, input name and width, class count."""
    width, classes = manifest.input.width, manifest.output.classes
    probabilities = {
        "type": "array",
        "items": {"type": "array", "items": {"type": "number"}, "minItems": classes, "maxItems": classes},
    }
    predict_response = {
        "type": "object",
        "required": ["probabilities", "labels", "model", "model_version", "defense"],
        "properties": {
            "probabilities": probabilities,
            "labels": {"type": "array", "items": {"type": "integer"}},
            "model": {"type": "string"},
            "model_version": {"type": "string"},
            "defense": {"type": "string"},
        },
    }
    tensor_out = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    }
    infer_request = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "shape", "datatype", "data"],
                    "properties": {
                        "name": {"type": "string", "enum": [manifest.input.name]},
                        "shape": {
                            "type": "array",
                            "items": {"type": "integer", "minimum": 0},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                        "datatype": {"type": "string", "enum": ["FP32", "FP64", "INT32", "INT64"]},
                        "data": {"type": "array", "items": _FEATURE},
                    },
                },
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "enum": list(OIP_OUTPUTS)}},
                },
            },
        },
    }
    infer_response = {
        "type": "object",
        "required": ["model_name", "model_version", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": tensor_out},
            "parameters": {"type": "object"},
        },
    }
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string", "enum": [manifest.name]}}
    not_found = {"404": "unknown model or version"}
    ready = {"type": "object"}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "mi-gateway",
            "version": __version__,
            "description": "Prediction gateway that defends the served model against membership inference; "
            "every confidence vector it returns is defended (docs/API.md).",
        },
        "paths": {
            "/predict": {
                "post": {
                    "summary": "Defended predictions for up to GATEWAY_MAX_BATCH_ROWS rows",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["instances"],
                                    "properties": {"instances": _matrix(width, max_rows)},
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(predict_response),
                        **_errors({k: v for k, v in _INFERENCE_ERRORS.items() if k != "404"}),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {
                        "200": _json({"type": "object"}),
                        "503": _json({"type": "object"}, "a model call is stuck past GATEWAY_BATCH_TIMEOUT_S"),
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness",
                    "responses": {"200": _json(ready), **_errors({"503": "not ready, with the reason"})},
                }
            },
            "/v2": {"get": {"summary": "OIP V2 server metadata", "responses": {"200": _json({"type": "object"})}}},
            "/v2/health/live": {
                "get": {
                    "summary": "OIP V2 liveness",
                    "responses": {"200": _json(ready), "503": _json(ready, "a model call is stuck")},
                }
            },
            "/v2/health/ready": {
                "get": {
                    "summary": "OIP V2 readiness",
                    "responses": {"200": _json(ready), "503": _json(ready, "not ready")},
                }
            },
            "/v2/models/{model}": {
                "get": {
                    "summary": "OIP V2 model metadata",
                    "parameters": [model],
                    "responses": {"200": _json({"type": "object"}), **_errors(not_found)},
                }
            },
            "/v2/models/{model}/ready": {
                "get": {
                    "summary": "OIP V2 model readiness",
                    "parameters": [model],
                    "responses": {"200": _json(ready), "503": _json(ready, "not ready"), **_errors(not_found)},
                }
            },
            "/v2/models/{model}/infer": {
                "post": {
                    "summary": "OIP V2 inference (JSON; the binary tensor data extension is also accepted: with "
                    "Inference-Header-Content-Length, JSON then raw tensor bytes, docs/API.md)",
                    "parameters": [model],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": infer_request}}},
                    "responses": {"200": _json(infer_response), **_errors(_INFERENCE_ERRORS)},
                }
            },
        },
    }
