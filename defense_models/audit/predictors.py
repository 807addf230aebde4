"""What an audit queries, behind one interface: X [N, D] -> released probabilities [N, C].

* ``RawOnnxPredictor``: the bundle's ONNX model with no defense (the undefended baseline).
* ``GatewayPredictor.in_process(bundle, defense=...)``: the gateway app itself, through its real HTTP
  stack (batching, validation, fail-closed guard) but without a socket.
* ``GatewayPredictor.over_http(url, api_key=...)``: a running deployment, with the contract of docs/API.md:
  batched ``/predict`` requests, bearer key, and ``Retry-After`` honoured on 429.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from gateway.artifacts import load_bundle


class Predictor(Protocol):
    name: str

    def predict(self, X: np.ndarray) -> np.ndarray:
        """X [N, D] -> probabilities [N, C] (float64)."""
        ...


class PredictorError(RuntimeError):
    pass


class RawOnnxPredictor:
    def __init__(self, bundle_dir: Path, *, batch_rows: int = 4096) -> None:
        from gateway.runner import OnnxRunner

        bundle = load_bundle(Path(bundle_dir))
        m = bundle.manifest
        self.name = f"{m.name} (raw ONNX, undefended)"
        self.kind = m.output.kind
        self.batch_rows = batch_rows
        self._runner = OnnxRunner(bundle.model_path, input_name=m.input.name, output_name=m.output.name,
                                  prefer_cuda=False)  # fmt: skip

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        out = np.concatenate([self._runner.run(X[i : i + self.batch_rows]) for i in range(0, len(X), self.batch_rows)])
        z = out.astype(np.float64)
        if self.kind == "probabilities":
            return z / z.sum(axis=1, keepdims=True)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)  # [N, C]


class _InProcessClient:
    """A synchronous ``post`` into an ASGI app whose lifespan runs on a private event loop thread."""

    def __init__(self, app: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="in-process-gateway", daemon=True)
        self._thread.start()
        self._lifespan = app.router.lifespan_context(app)
        self._call(self._lifespan.__aenter__())  # bundle, runner, defense, warm-up
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def post(self, path: str, json: Any) -> httpx.Response:
        return self._call(self._client.post(path, json=json))

    def get(self, path: str) -> httpx.Response:
        return self._call(self._client.get(path))

    def close(self) -> None:
        self._call(self._client.aclose())
        self._call(self._lifespan.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class GatewayPredictor:
    """Queries ``/predict`` through an httpx client: a live URL or the app in-process."""

    def __init__(self, client: httpx.Client, name: str, *, batch_rows: int = 256, max_retries: int = 10,
                 closer: Any = None) -> None:  # fmt: skip
        self._client = client
        self.name = name
        self.batch_rows = batch_rows
        self.max_retries = max_retries
        self._closer = closer
        self.queries = 0  # rows sent, for query budgets in reports

    @classmethod
    def over_http(cls, url: str, *, api_key: str | None = None, timeout_s: float = 60.0, **kw: Any) -> GatewayPredictor:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        return cls(client, f"gateway at {url}", closer=client.close, **kw)

    @classmethod
    def in_process(cls, bundle_dir: Path, **settings: Any) -> GatewayPredictor:
        """The gateway app with ``settings`` (e.g. defense="memguard", noise_secret=...), no socket."""
        from gateway.app import create_app
        from gateway.settings import GatewaySettings

        settings.setdefault("metrics_port", 0)  # no socket: the audit reads the public routes only
        config = GatewaySettings(_env_file=None, artifacts=Path(bundle_dir), **settings)
        client = _InProcessClient(create_app(config))
        return cls(client, f"gateway in-process ({config.defense})", closer=client.close,  # type: ignore[arg-type]
                   batch_rows=config.max_batch_rows)  # fmt: skip

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        parts, start = [], 0
        while start < len(X):
            chunk = X[start : start + self.batch_rows]  # batch_rows may shrink inside _post (413)
            parts.append(self._post(chunk))
            start += len(chunk)
        return np.concatenate(parts) if parts else np.zeros((0, 0))

    def _post(self, rows: np.ndarray) -> np.ndarray:
        body = {"instances": rows.tolist()}
        for _ in range(self.max_retries + 1):
            r = self._client.post("/predict", json=body)
            if r.status_code == 429:  # queue full or over the query budget: wait as told
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code == 413 and len(rows) > 1:  # over the gateway's row or byte limit: halve
                self.batch_rows = max(1, len(rows) // 2)
                half = len(rows) // 2
                return np.concatenate([self._post(rows[:half]), self._post(rows[half:])])
            if r.status_code != 200:
                raise PredictorError(f"{self.name} answered {r.status_code}: {r.json().get('error', r.text)[:200]}")
            self.queries += len(rows)
            return np.asarray(r.json()["probabilities"], dtype=np.float64)
        raise PredictorError(f"{self.name} kept answering 429 after {self.max_retries} retries")

    def scrape(self) -> tuple[int, str]:
        """GET /metrics on the port clients use -> (status, body): what a client could read there."""
        r = self._client.get("/metrics")
        return r.status_code, r.text

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> GatewayPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
