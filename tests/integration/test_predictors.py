"""The audit's predictors: raw ONNX, the gateway in-process, and a gateway over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from defense_models.audit.predictors import GatewayPredictor, PredictorError, RawOnnxPredictor
from tests.conftest import WIDTH, tiny_model
from tests.integration.test_server import free_port, wait_ready

SECRET = "0123456789abcdef0123456789abcdef"
X = np.random.default_rng(0).normal(size=(300, WIDTH)).astype(np.float32)


def test_raw_onnx_is_the_undefended_softmax(tiny_bundle: Path) -> None:
    p = RawOnnxPredictor(tiny_bundle, batch_rows=128).predict(X)
    with torch.no_grad():
        want = torch.softmax(tiny_model()(torch.from_numpy(X)).double(), 1).numpy()
    np.testing.assert_allclose(p, want, atol=1e-5)


def test_in_process_gateway_matches_raw_without_defense(tiny_bundle: Path) -> None:
    with GatewayPredictor.in_process(tiny_bundle, max_batch_rows=64) as gw:
        got = gw.predict(X)
        assert gw.queries == len(X) and gw.batch_rows == 64
        gw.batch_rows = 200  # too many rows per request: 413, then halved until they fit
        np.testing.assert_allclose(gw.predict(X), got, atol=1e-12)
        assert gw.batch_rows <= 64
    np.testing.assert_allclose(got, RawOnnxPredictor(tiny_bundle).predict(X), atol=1e-6)


def test_http_gateway_with_key_and_budget_agrees_with_in_process_replica(defended_bundle: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_ARTIFACTS": str(defended_bundle), "GATEWAY_PORT": str(port), "GATEWAY_DEFENSE": "memguard",
                "GATEWAY_NOISE_SECRET": SECRET, "GATEWAY_API_KEYS": "audit-key", "GATEWAY_LOG_LEVEL": "warning",
                "GATEWAY_QUERY_BUDGET_ROWS_PER_S": "400", "GATEWAY_QUERY_BUDGET_BURST": "200"})  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        with GatewayPredictor.over_http(url, api_key="audit-key", batch_rows=100) as http:
            remote = http.predict(X)  # 300 rows against a 200-row burst: waits on 429 Retry-After
        with GatewayPredictor.in_process(defended_bundle, defense="memguard", noise_secret=SECRET) as local:
            replica = local.predict(X)
        # another replica with the same secret gives the same defended answers
        assert np.abs(remote - replica).max() <= 1e-6
        assert (remote.argmax(1) == RawOnnxPredictor(defended_bundle).predict(X).argmax(1)).all()
        with GatewayPredictor.over_http(url, api_key="wrong") as bad, pytest.raises(PredictorError, match="401"):
            bad.predict(X[:2])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
