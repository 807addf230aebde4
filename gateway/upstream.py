"""Upstream proxy mode: forward each batch to an existing model server and defend what comes back.

The sidecar use: the gateway sits next to KServe, Triton or any JSON model server
(``GATEWAY_UPSTREAM_URL``) and plays the ``ModelRunner`` role. One pooled HTTP connection set, a
per-request timeout, and bounded retries on failures that are safe to retry (inference is a pure
function of its input): connection errors, timeouts and 502/503/504. Everything else fails closed:

* upstream unreachable or 5xx after the retries → ``UpstreamError`` (502);
* upstream too slow after the retries → ``UpstreamTimeout`` (504);
* a 4xx from upstream, a body that is not JSON, a wrong shape or non-finite values → 502.

Messages carry status codes, shapes and field names only: never the upstream's (undefended)
confidence values.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import numpy as np
import orjson

from gateway.artifacts import Manifest
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.logs import upstream_headers
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.upstream")

RETRYABLE_STATUS = frozenset({502, 503, 504})
#: One attempt of a readiness probe or of the startup check: a probe must answer within a second.
PROBE_BUDGET_S = 0.8


class UpstreamRunner:
    provider = "upstream"
    #: Each call carries its batch's ``X-Request-ID`` (and ``traceparent`` for a one-request batch).
    forwards_headers = True

    def __init__(self, settings: GatewaySettings, manifest: Manifest) -> None:
        assert settings.upstream_url is not None
        self.base = str(settings.upstream_url).rstrip("/")
        self.protocol = settings.upstream_protocol
        self.model = settings.upstream_model or manifest.name
        self.input_name = manifest.input.name
        self.classes = manifest.output.classes
        self.width = manifest.input.width
        self.input_field = settings.upstream_input_field
        self.output_field = settings.upstream_output_field or ("predictions" if self.protocol == "json" else None)
        self.retries = settings.upstream_retries
        self.backoff_s = 0.05
        self.timeout_s = settings.upstream_timeout_s  # per attempt: connect, send and the whole answer
        self.deadline_s = settings.upstream_deadline_s or settings.upstream_timeout_s * (settings.upstream_retries + 1)
        #: Monotonic time of the first failed call of the current run of failures; None while calls succeed.
        #: Readiness reads it: a gateway whose upstream is failing is not ready.
        self.failing_since: float | None = None
        path = f"/v2/models/{self.model}/infer" if self.protocol == "oip" else ""
        self.endpoint = self.base + path if self.protocol == "oip" else self.base
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.upstream_timeout_s),
            limits=httpx.Limits(max_connections=settings.upstream_max_connections,
                                max_keepalive_connections=settings.upstream_max_connections),
        )  # fmt: skip

    # --- the ModelRunner protocol --------------------------------------------------------------
    def run(self, x: np.ndarray) -> np.ndarray:
        """x[B, D] float32 -> upstream outputs [B, C] float32, or UpstreamError / UpstreamTimeout.

        Each attempt has ``timeout_s`` for everything (a body trickling in byte by byte is cut off too), and all
        attempts with their backoffs ``deadline_s``: the single batch worker is never held longer."""
        return self._call(x, self.timeout_s, self.deadline_s, self.retries)

    def _call(self, x: np.ndarray, timeout_s: float, deadline_s: float, retries: int) -> np.ndarray:
        try:
            out = self._attempts(x, timeout_s, deadline_s, retries)
        except (UpstreamError, UpstreamTimeout):
            self.failing_since = self.failing_since or time.monotonic()
            raise
        self.failing_since = None
        return out

    def _attempts(self, x: np.ndarray, timeout_s: float, deadline_s: float, retries: int) -> np.ndarray:
        body = orjson.dumps(self._request(x), option=orjson.OPT_SERIALIZE_NUMPY)
        last: Exception = UpstreamError("the upstream model server was not called")
        overall = time.monotonic() + deadline_s
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), max(overall - time.monotonic(), 0)))
            budget = min(timeout_s, overall - time.monotonic())
            if budget <= 0:
                break
            try:
                response = self._post(body, budget)
            except httpx.TimeoutException:
                last = UpstreamTimeout(
                    f"the upstream model server did not answer within the timeout ({attempt + 1} attempts); "
                    "check it or raise GATEWAY_UPSTREAM_TIMEOUT_S (per attempt) / GATEWAY_UPSTREAM_DEADLINE_S"
                )
                continue
            except httpx.TransportError as exc:
                last = UpstreamError(f"cannot reach the upstream model server ({type(exc).__name__}, "
                                     f"{attempt + 1} attempts); check GATEWAY_UPSTREAM_URL")  # fmt: skip
                continue
            if response.status_code in RETRYABLE_STATUS:
                last = UpstreamError(f"the upstream model server answered {response.status_code} "
                                     f"({attempt + 1} attempts)")  # fmt: skip
                continue
            if response.status_code != 200:
                raise UpstreamError(f"the upstream model server answered {response.status_code}; "
                                    "check GATEWAY_UPSTREAM_PROTOCOL and GATEWAY_UPSTREAM_MODEL")  # fmt: skip
            return self._outputs(response.content, x.shape[0])
        log.warning("upstream failed: %s", type(last).__name__)
        raise last

    def _post(self, body: bytes, budget_s: float) -> httpx.Response:
        """One attempt, over within ``budget_s`` (httpx's timeouts bound each read; this bounds their sum)."""
        deadline = time.monotonic() + budget_s
        headers = {"Content-Type": "application/json", **(upstream_headers.get() or {})}
        with self._client.stream("POST", self.endpoint, content=body, headers=headers, timeout=budget_s) as r:
            chunks = []
            for chunk in r.iter_raw():
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the answer did not arrive within the attempt's deadline")
            return httpx.Response(r.status_code, content=b"".join(chunks))

    def probe(self) -> bool:
        """One-row call, one attempt, ``PROBE_BUDGET_S`` at most: is the upstream answering correctly now?"""
        try:
            self._call(np.zeros((1, self.width), dtype=np.float32), PROBE_BUDGET_S, PROBE_BUDGET_S, 0)
        except (UpstreamError, UpstreamTimeout):
            return False
        return True

    def close(self) -> None:
        self._client.close()

    # --- wire formats ----------------------------------------------------------------------------
    def _request(self, x: np.ndarray) -> dict[str, Any]:
        if self.protocol == "oip":
            return {"inputs": [{"name": self.input_name, "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel()}]}  # fmt: skip
        return {self.input_field: x}

    def _outputs(self, content: bytes, rows: int) -> np.ndarray:
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise UpstreamError("the upstream model server answered with a body that is not JSON") from None
        try:
            if self.protocol == "oip":
                outputs = body["outputs"]
                out = next(o for o in outputs if o["name"] == self.output_field) if self.output_field else outputs[0]
                data = np.asarray(out["data"]).reshape(out["shape"])
            else:
                data = np.asarray(body[self.output_field])
        except (KeyError, IndexError, StopIteration, TypeError, ValueError):
            field = self.output_field or "outputs[0]"
            raise UpstreamError(f"the upstream answer has no usable `{field}` tensor; "
                                "check GATEWAY_UPSTREAM_OUTPUT_FIELD") from None  # fmt: skip
        if data.dtype.kind not in "iuf":  # strings, booleans or nulls: a protocol fault, never coerced
            raise UpstreamError("the upstream returned non-finite or non-numeric values (nulls, strings or booleans "
                                "in the tensor)")  # fmt: skip
        if data.shape != (rows, self.classes):
            raise UpstreamError(f"the upstream returned shape {list(data.shape)}, expected [{rows}, {self.classes}] "
                                "(the manifest's class count)")  # fmt: skip
        if not np.isfinite(data).all():
            raise UpstreamError("the upstream returned non-finite values")
        with np.errstate(over="ignore"):
            out32 = data.astype(np.float32)
        if not np.isfinite(out32).all():
            raise UpstreamError("the upstream returned values outside the float32 range")
        return out32
