"""/metrics is not a membership oracle for clients: its own port by default, optional token, and the audit's
scraper attacker gets nothing from a gateway started with the defaults."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defense_models.audit.config import AuditConfig
from defense_models.audit.predictors import GatewayPredictor
from defense_models.audit.queries import metrics_probe, timing_probe
from tests.conftest import make_settings, metric_value, rows, serving

SECRET = "0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:  # the error holds the response's socket: close it here, not at some later GC
            return exc.code, exc.read().decode()


async def test_by_default_metrics_live_on_their_own_port_only(defended_bundle: Path) -> None:
    port = free_port()
    settings = make_settings(defended_bundle, defense="memguard", noise_secret=SECRET, metrics_port=port,
                             metrics_public=False)  # fmt: skip
    async with serving(settings) as (client, _):
        assert (await client.post("/predict", json={"instances": rows(3)})).status_code == 200
        public = await client.get("/metrics")
        assert public.status_code == 404 and "own port" in public.json()["error"]
        status, text = scrape(port)
        assert status == 200
        assert metric_value(text, "gateway_defended_rows_total", defense="memguard", outcome="perturbed") >= 0
        assert "gateway_defense_l1_distortion_bucket" in text


async def test_a_metrics_token_guards_both_ports(defended_bundle: Path) -> None:
    port = free_port()
    settings = make_settings(defended_bundle, metrics_port=port, metrics_public=True, metrics_token="scrape-me")
    async with serving(settings) as (client, _):
        assert scrape(port)[0] == 401 and scrape(port, "wrong")[0] == 401
        assert scrape(port, "scrape-me")[0] == 200
        assert (await client.get("/metrics")).status_code == 401
        ok = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200 and "gateway_ready" in ok.text


async def test_a_busy_metrics_port_refuses_startup_with_the_fix(defended_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = make_settings(defended_bundle, metrics_port=taken.getsockname()[1])
        with pytest.raises(Exception, match="GATEWAY_METRICS_PORT"):
            async with serving(settings):
                pass


class _Sets:
    def __init__(self, X_in: np.ndarray, X_out: np.ndarray) -> None:
        self._rows = {"target_train": X_in, "eval_nonmember": X_out}

    def rows(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        return self._rows[role], np.zeros(len(self._rows[role]), dtype=np.int64)


@pytest.mark.parametrize("public", [False, True])
def test_the_scraper_attacker_reads_nothing_from_the_defaults(defended_bundle: Path, public: bool) -> None:
    """The audit's scraper view against an in-process gateway: with the defaults it gets a 404; with the
    metrics on the clients' port it reads the L1 bucket of every single query (the leak the default closes)."""
    X = np.asarray(rows(40, seed=3), dtype=np.float32)
    extra: dict[str, Any] = {"metrics_public": True} if public else {}
    with GatewayPredictor.in_process(defended_bundle, defense="memguard", noise_secret=SECRET,
                                     log_level="warning", **extra) as predictor:  # fmt: skip
        probe = metrics_probe(AuditConfig(bundle=defended_bundle, metrics_probe_rows=20), predictor,
                              _Sets(X[:20], X[20:]))  # type: ignore[arg-type]  # fmt: skip
    if not public:
        assert probe.reachable is False and probe.status == 404 and probe.auc is None
    else:
        assert probe.reachable and probe.rows == 20 and probe.auc is not None and probe.auc >= 0.5


class _TimedPredictor:
    """Answers after 2 ms for rows whose first feature is 1 (the 'members' below), at once otherwise."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        if X[0, 0] == 1:
            time.sleep(0.002)
        return np.zeros((len(X), 2))


def test_the_timing_attacker_separates_rows_whose_work_differs(defended_bundle: Path) -> None:
    X_in, X_out = np.ones((10, 3), dtype=np.float32), np.zeros((10, 3), dtype=np.float32)
    config = AuditConfig(bundle=defended_bundle, timing_probe_rows=10, timing_probe_repeats=2)
    probe = timing_probe(config, _TimedPredictor(), _Sets(X_in, X_out))  # type: ignore[arg-type]
    assert probe.rows == 10 and probe.repeats == 2 and not probe.over_http
    # perfect separation: 1 within float rounding (the AUC sums rates; it came out 0.9999999999999999 here)
    assert probe.auc == pytest.approx(1.0, abs=1e-9) and probe.balanced_accuracy == pytest.approx(1.0, abs=1e-9)
    assert probe.member_median_ms >= 2.0
    assert probe.p_value < 0.01 and 0.5 < probe.noise_auc_95 < 0.9  # no shuffle of the labels comes close


def test_memguard_answers_leave_at_the_timing_quantum(defended_bundle: Path) -> None:
    """Through the gateway, every single-row MemGuard answer takes one 50 ms mark (the default quantum), members
    and non-members alike; with GATEWAY_TIMING_QUANTUM_MS=0 they come back at once."""
    X = np.asarray(rows(24, seed=5), dtype=np.float32)
    config = AuditConfig(bundle=defended_bundle, timing_probe_rows=12, timing_probe_repeats=1)
    medians = {}
    for quantum in (None, 0):
        with GatewayPredictor.in_process(defended_bundle, defense="memguard", noise_secret=SECRET, log_level="warning",
                                         timing_quantum_ms=quantum) as predictor:  # fmt: skip
            probe = timing_probe(config, predictor, _Sets(X[:12], X[12:]))  # type: ignore[arg-type]
        medians[quantum] = (probe.member_median_ms, probe.nonmember_median_ms)
    assert all(50 <= m < 90 for m in medians[None]), medians
    assert all(m < 45 for m in medians[0]), medians
