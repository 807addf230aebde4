"""The HTTP contract (API.md): every route, status code and error body."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.defenses import register_defense, unregister_defense
from tests.conftest import (
    CLASSES,
    WIDTH,
    FakeRunner,
    RaisingDefense,
    make_settings,
    metric_value,
    rows,
    serving,
    softmax,
)

JSON = {"Content-Type": "application/json"}


async def test_predict_returns_the_contract_body(tiny_bundle: Path) -> None:
    runner = FakeRunner()
    async with serving(make_settings(tiny_bundle), runner) as (client, app):
        x = rows(3)
        r = await client.post("/predict", json={"instances": x})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"probabilities", "labels", "model", "model_version", "defense"}
        p = np.array(body["probabilities"])
        assert p.shape == (3, CLASSES) and (p >= 0).all()
        assert np.abs(p.sum(1) - 1).max() <= 1e-6
        assert body["labels"] == p.argmax(1).tolist()
        np.testing.assert_allclose(p, softmax(np.array(x, np.float32) @ runner.W), atol=1e-5)
        manifest = app.state.gateway.bundle.manifest
        assert (body["model"], body["model_version"], body["defense"]) == ("tiny", manifest.version, "none")


async def test_real_onnx_model_matches_torch(tiny_bundle: Path) -> None:
    import torch

    from tests.conftest import tiny_model

    async with serving(make_settings(tiny_bundle)) as (client, app):
        assert app.state.gateway.runner.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
        x = rows(5, seed=4)
        r = await client.post("/predict", json={"instances": x})
        with torch.no_grad():
            want = torch.softmax(tiny_model()(torch.tensor(x)).double(), 1).numpy()
        np.testing.assert_allclose(np.array(r.json()["probabilities"]), want, atol=1e-5)


async def test_concurrent_requests_are_batched_and_answered_in_order(tiny_bundle: Path) -> None:
    runner = FakeRunner(delay_s=0.01)
    settings = make_settings(tiny_bundle, max_batch_size=16, max_queue_delay_ms=20)
    async with serving(settings, runner) as (client, _):
        xs = [rows(1 + i % 3, seed=i) for i in range(24)]
        responses = await asyncio.gather(*(client.post("/predict", json={"instances": x}) for x in xs))
        for x, r in zip(xs, responses, strict=True):
            assert r.status_code == 200
            np.testing.assert_allclose(
                np.array(r.json()["probabilities"]), softmax(np.array(x, np.float32) @ runner.W), atol=1e-5
            )
        served = [b for b in runner.batches[2:]]  # the first two are the warm-up
        assert max(served) > 1 and sum(served) == sum(len(x) for x in xs)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"rows": []}', 400, "JSON object"),
        (b'{"instances": []}', 400, "empty"),
        (b'{"instances": 5}', 400, "JSON array of rows"),
        (json.dumps({"instances": [[0.0] * (WIDTH - 1)]}).encode(), 400, f"exactly {WIDTH} values"),
        (json.dumps({"instances": [[0.0] * WIDTH, [0.0] * (WIDTH + 1)]}).encode(), 400, "rectangular"),
        (json.dumps({"instances": [[0.0] * WIDTH, 1.0]}).encode(), 400, "rectangular"),
        (json.dumps({"instances": [0.0] * WIDTH}).encode(), 400, "2-D"),
        (json.dumps({"instances": [[[0.0] * WIDTH]]}).encode(), 400, "2-D"),
        (json.dumps({"instances": [["a"] * WIDTH]}).encode(), 400, "only numbers"),
        (json.dumps({"instances": [[None] * WIDTH]}).encode(), 400, "only numbers"),
        (json.dumps({"instances": [[True] * WIDTH]}).encode(), 400, "only numbers"),
        (json.dumps({"instances": [[True] + [0.5] * (WIDTH - 1)]}).encode(), 400, "mixes booleans"),
        (json.dumps({"instances": [[1e39] * WIDTH]}).encode(), 400, "non-finite"),
        (b'{"instances": [[' + b",".join([b"1e400"] * WIDTH) + b"]]}", 400, "infinity"),
        (b'{"instances": [[NaN' + b",0" * (WIDTH - 1) + b"]]}", 400, "malformed JSON"),
        (json.dumps({"instances": [[0.0] * WIDTH] * 5}).encode(), 413, "limit is 4"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(tiny_bundle: Path, body: bytes, status: int, fragment: str) -> None:
    async with serving(make_settings(tiny_bundle, max_batch_rows=4), FakeRunner()) as (client, _):
        r = await client.post("/predict", content=body, headers=JSON)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]
        assert set(r.json()) == {"error"}
        ok = await client.post("/predict", json={"instances": rows(1)})  # nothing lost, still serving
        assert ok.status_code == 200


async def test_content_type_and_body_size(tiny_bundle: Path) -> None:
    async with serving(make_settings(tiny_bundle, max_body_bytes=2048), FakeRunner()) as (client, _):
        body = json.dumps({"instances": rows(1)})
        r = await client.post("/predict", content=body, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]
        r = await client.post("/predict", content=body)
        assert r.status_code == 415
        r = await client.post("/predict", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200
        big = json.dumps({"instances": rows(40)})
        r = await client.post("/predict", content=big, headers=JSON)
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]

        async def chunks():  # no Content-Length: the limit is enforced while streaming
            for i in range(0, len(big), 512):
                yield big[i : i + 512].encode()

        r = await client.post("/predict", content=chunks(), headers=JSON)
        assert r.status_code == 413


async def test_api_keys_guard_inference_but_not_health_or_metrics(tiny_bundle: Path) -> None:
    settings = make_settings(tiny_bundle, api_keys="k1,k2")
    async with serving(settings, FakeRunner()) as (client, _):
        body = {"instances": rows(1)}
        r = await client.post("/predict", json=body)
        assert r.status_code == 401 and "Bearer" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        r = await client.post("/predict", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and "not recognised" in r.json()["error"]
        r = await client.post("/predict", json=body, headers={"Authorization": "Basic k1"})
        assert r.status_code == 401
        for key in ("k1", "k2"):
            r = await client.post("/predict", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        r = await client.post("/v2/models/tiny/infer", json=_oip(rows(1)))
        assert r.status_code == 401
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
            assert (await client.get(path)).status_code == 200, path


def _oip(x: list[list[float]], **extra: object) -> dict[str, object]:
    flat = [v for row in x for v in row]
    return {
        "inputs": [{"name": "input", "shape": [len(x), WIDTH], "datatype": "FP32", "data": flat}],
        **extra,
    }


async def test_oip_v2_routes(tiny_bundle: Path) -> None:
    runner = FakeRunner()
    async with serving(make_settings(tiny_bundle), runner) as (client, app):
        version = app.state.gateway.bundle.manifest.version
        assert (await client.get("/v2")).json()["name"] == "mi-gateway"
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        meta = (await client.get("/v2/models/tiny")).json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, WIDTH]}]
        assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]}
        assert meta["versions"] == [version]
        assert (await client.get(f"/v2/models/tiny/versions/{version}")).status_code == 200
        assert (await client.get("/v2/models/tiny/ready")).json() == {"name": "tiny", "ready": True}

        x = rows(2)
        r = await client.post("/v2/models/tiny/infer", json=_oip(x, id="req-7"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == "req-7" and body["model_name"] == "tiny" and body["model_version"] == version
        out = body["outputs"][0]
        assert out["name"] == "probabilities" and out["shape"] == [2, CLASSES] and out["datatype"] == "FP32"
        p = np.array(out["data"]).reshape(2, CLASSES)
        np.testing.assert_allclose(p, softmax(np.array(x, np.float32) @ runner.W), atol=1e-5)
        assert body["outputs"][1]["data"] == p.argmax(1).tolist()
        nested = _oip(x)
        nested["inputs"][0]["data"] = x  # type: ignore[index]
        assert (await client.post(f"/v2/models/tiny/versions/{version}/infer", json=nested)).status_code == 200


@pytest.mark.parametrize(
    ("mutate", "status", "fragment"),
    [
        (lambda b: b["inputs"][0].update(name="x"), 400, "model's input is 'input'"),
        (lambda b: b["inputs"][0].update(datatype="BYTES"), 400, "not supported"),
        (lambda b: b["inputs"][0].update(shape=[1, WIDTH]), 400, "needs"),
        (lambda b: b["inputs"][0].update(shape=[2, WIDTH + 1]), 400, f"[B, {WIDTH}]"),
        (lambda b: b["inputs"][0].update(shape="2x8"), 400, "shape"),
        (lambda b: b["inputs"].append(b["inputs"][0]), 400, "exactly one input"),
        (lambda b: b.pop("inputs"), 400, "OIP V2 request"),
        (lambda b: b["inputs"][0].update(shape=[9, WIDTH]), 413, "limit is 4"),
        (lambda b: b["inputs"][0]["data"].__setitem__(0, "x"), 400, "only numbers"),
    ],
)
async def test_oip_bad_input(tiny_bundle: Path, mutate, status: int, fragment: str) -> None:  # type: ignore[no-untyped-def]
    async with serving(make_settings(tiny_bundle, max_batch_rows=4), FakeRunner()) as (client, _):
        body = _oip(rows(2))
        mutate(body)
        r = await client.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]


async def test_unknown_model_route_and_method(tiny_bundle: Path) -> None:
    async with serving(make_settings(tiny_bundle), FakeRunner()) as (client, _):
        for r in (
            await client.get("/v2/models/other"),
            await client.post("/v2/models/other/infer", json=_oip(rows(1))),
            await client.get("/v2/models/tiny/versions/zzz"),
            await client.get("/v2/models/other/ready"),
        ):
            assert (
                r.status_code == 404 and "this gateway serves 'tiny'" in r.json()["error"]
            ) or "version" in r.json()["error"]
        r = await client.get("/nope")
        assert r.status_code == 404 and "no route" in r.json()["error"]
        long_name = "m" * 8000
        for path in (f"/v2/models/{long_name}", f"/v2/models/tiny/versions/{long_name}/infer"):
            r = await client.request("GET" if path.endswith(long_name) else "POST", path, json=_oip(rows(1)))
            assert r.status_code == 404 and len(r.content) < 300 and "8000 characters" in r.json()["error"]
        r = await client.get("/predict")
        assert r.status_code == 405 and "not allowed" in r.json()["error"]


async def test_queue_full_is_429_with_retry_after(tiny_bundle: Path) -> None:
    runner = FakeRunner(delay_s=0.2)
    settings = make_settings(tiny_bundle, max_batch_size=1, max_queue_rows=2, max_queue_delay_ms=0)
    async with serving(settings, runner) as (client, _):
        tasks = [asyncio.ensure_future(client.post("/predict", json={"instances": rows(1)})) for _ in range(6)]
        results = await asyncio.gather(*tasks)
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 429 in codes
        limited = next(r for r in results if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and "queue is full" in limited.json()["error"]


async def test_model_failure_is_isolated_and_a_5xx(tiny_bundle: Path) -> None:
    async with serving(make_settings(tiny_bundle, max_queue_delay_ms=30), FakeRunner()) as (client, _):
        poison = rows(1)
        poison[0][0] = FakeRunner.POISON
        good, bad = await asyncio.gather(
            client.post("/predict", json={"instances": rows(2)}),
            client.post("/predict", json={"instances": poison}),
        )
        assert good.status_code == 200
        assert bad.status_code == 500 and "model failed" in bad.json()["error"]


async def test_fail_closed_reject_is_503_without_vectors(tiny_bundle: Path) -> None:
    register_defense(RaisingDefense)
    try:
        async with serving(make_settings(tiny_bundle, defense="test_raises"), FakeRunner()) as (client, _):
            r = await client.post("/predict", json={"instances": rows(2)})
            assert r.status_code == 503 and set(r.json()) == {"error"} and "withheld" in r.json()["error"]
            text = (await client.get("/metrics")).text
            assert metric_value(text, "gateway_defended_rows_total", defense="test_raises", outcome="fallback") == 2
    finally:
        unregister_defense("test_raises")


@pytest.mark.parametrize("on_error", ["reject", "label_only"])
async def test_inputs_the_model_overflows_on_get_422_not_a_fallback(tiny_bundle: Path, on_error: str) -> None:
    """Finite inputs whose model output is not finite (e.g. every feature ±3e38) are the client's range problem."""
    async with serving(make_settings(tiny_bundle, on_defense_error=on_error), FakeRunner()) as (client, _):
        x = rows(3)
        x[1][0] = FakeRunner.NAN_ROW  # the fake model returns NaN for this finite input
        ok, bad = await asyncio.gather(client.post("/predict", json={"instances": rows(2, seed=9)}),
                                       client.post("/predict", json={"instances": x}))  # fmt: skip
        assert ok.status_code == 200
        assert bad.status_code == 422 and set(bad.json()) == {"error"} and "[1]" in bad.json()["error"]
        assert "out of the range" in bad.json()["error"]
        text = (await client.get("/metrics")).text
        assert metric_value(text, "gateway_defended_rows_total", defense="none", outcome="fallback") == 0
        assert metric_value(text, "gateway_defended_rows_total", defense="none", outcome="out_of_range") == 1


async def test_metrics_are_present_and_move(tiny_bundle: Path) -> None:
    async with serving(make_settings(tiny_bundle), FakeRunner()) as (client, _):
        before = (await client.get("/metrics")).text
        for name in (
            "gateway_request_duration_seconds",
            "gateway_batch_size",
            "gateway_queue_wait_seconds",
            "gateway_model_inference_seconds",
            "gateway_defense_seconds",
            "gateway_defense_l1_distortion",
            "gateway_defended_rows_total",
            "gateway_label_changes_total",
            "gateway_queue_depth",
            "gateway_model_info",
        ):
            assert f"# TYPE {name.removesuffix('_total')}" in before, name
        assert metric_value(before, "gateway_model_info", model="tiny", provider="CPUExecutionProvider") == 1
        assert metric_value(before, "gateway_defended_rows_total", defense="none", outcome="unchanged") == 0
        await client.post("/predict", json={"instances": rows(3)})
        await client.post("/predict", content=b"{", headers=JSON)
        after = (await client.get("/metrics")).text
        assert metric_value(after, "gateway_defended_rows_total", defense="none", outcome="unchanged") == 3
        assert metric_value(after, "gateway_batch_size_count") == 1
        assert metric_value(after, "gateway_model_inference_seconds_count") == 1
        assert metric_value(after, "gateway_defense_seconds_count", defense="none") == 1
        assert metric_value(after, "gateway_defense_l1_distortion_count", defense="none") == 3
        assert metric_value(after, "gateway_queue_wait_seconds_count") == 1
        assert metric_value(after, "gateway_label_changes_total", defense="none") == 0
        assert metric_value(after, "gateway_request_duration_seconds_count", route="/predict", status="200") == 1
        assert metric_value(after, "gateway_request_duration_seconds_count", route="/predict", status="400") == 1
        assert metric_value(after, "gateway_queue_depth") == 0
        assert metric_value(after, "gateway_ready") == 1


async def test_require_gpu_keeps_readiness_503_on_cpu(tiny_bundle: Path) -> None:
    async with serving(make_settings(tiny_bundle, require_gpu=True), FakeRunner()) as (client, _):
        r = await client.get("/readyz")
        assert r.status_code == 503 and "GATEWAY_REQUIRE_GPU" in r.json()["error"]
        assert metric_value((await client.get("/metrics")).text, "gateway_ready") == 0
        assert (await client.get("/v2/health/ready")).status_code == 503
        assert (await client.get("/healthz")).status_code == 200
    async with serving(make_settings(tiny_bundle, require_gpu=True), FakeRunner(provider="CUDAExecutionProvider")) as (
        client,
        _,
    ):
        assert (await client.get("/readyz")).status_code == 200


async def test_shutdown_drains_and_readiness_reports_it(tiny_bundle: Path) -> None:
    runner = FakeRunner(delay_s=0.05)
    app_ref = {}
    async with serving(make_settings(tiny_bundle, max_batch_size=1, max_queue_delay_ms=0), runner) as (
        client,
        app,
    ):
        app_ref["app"] = app
        inflight = [asyncio.ensure_future(client.post("/predict", json={"instances": rows(1)})) for _ in range(3)]
        await asyncio.sleep(0.01)
    state = app_ref["app"].state.gateway
    assert state.draining and state.not_ready_reason() is not None and runner.closed
    answers = await asyncio.wait_for(asyncio.gather(*inflight), 5)  # every in-flight request is answered
    assert all(r.status_code == 200 for r in answers)


async def test_fresh_tokens_do_not_bypass_the_budget_without_keys(tiny_bundle: Path) -> None:
    """No GATEWAY_API_KEYS: a random bearer token per request is still the same client (its address)."""
    settings = make_settings(tiny_bundle, query_budget_rows_per_s=0.001, query_budget_burst=4)
    async with serving(settings, FakeRunner()) as (client, _):
        codes = []
        for i in range(4):
            r = await client.post("/predict", json={"instances": rows(2)}, headers={"Authorization": f"Bearer {i}"})
            codes.append(r.status_code)
    assert codes == [200, 200, 429, 429]


async def test_query_budget_is_per_client_and_429(tiny_bundle: Path) -> None:
    settings = make_settings(tiny_bundle, api_keys="k1,k2", query_budget_rows_per_s=0.001, query_budget_burst=4)
    async with serving(settings, FakeRunner()) as (client, _):
        k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
        assert (await client.post("/predict", json={"instances": rows(3)}, headers=k1)).status_code == 200
        r = await client.post("/v2/models/tiny/infer", json=_oip(rows(2)), headers=k1)
        assert r.status_code == 429 and "query budget" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
        bad = await client.post("/predict", json={"instances": [[1.0]]}, headers=k1)
        assert bad.status_code == 400  # invalid requests are rejected before they cost budget
        assert (await client.post("/predict", json={"instances": rows(4)}, headers=k2)).status_code == 200


async def test_oip_binary_and_untyped_bodies_are_checked(tiny_bundle: Path) -> None:
    """The binary tensor extension's framing is validated (400s naming the fault); a body without a Content-Type
    is JSON on OIP routes (tritonclient sends none) but still a 415 on /predict."""
    x = np.random.default_rng(0).random((2, WIDTH)).astype(np.float32)

    def binary_request(size: int, header_extra: int = 0, blob: bytes | None = None) -> tuple[bytes, dict[str, str]]:
        head = json.dumps({"inputs": [{"name": "input", "shape": [2, WIDTH], "datatype": "FP32",
                                       "parameters": {"binary_data_size": size}}]}).encode()  # fmt: skip
        data = x.tobytes() if blob is None else blob
        return head + data, {"Inference-Header-Content-Length": str(len(head) + header_extra)}

    async with serving(make_settings(tiny_bundle), FakeRunner()) as (client, _):
        body, headers = binary_request(x.nbytes)
        ok = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert ok.status_code == 200 and ok.json()["outputs"][1]["data"] == (x @ FakeRunner().W).argmax(1).tolist()
        for args, fragment in [((x.nbytes - 4,), "binary_data_size"), ((x.nbytes, 10**6), "Inference-Header"),
                               ((x.nbytes, 0, x.tobytes()[:-4]), "binary_data_size")]:  # fmt: skip
            body, headers = binary_request(*args)  # type: ignore[arg-type]
            r = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
            assert r.status_code == 400 and fragment in r.json()["error"], r.text
        plain = json.dumps({"inputs": [{"name": "input", "shape": [2, WIDTH], "datatype": "FP32",
                                        "data": x.ravel().tolist()}]}).encode()  # fmt: skip
        assert (await client.post("/v2/models/tiny/infer", content=plain)).status_code == 200
        untyped = await client.post("/predict", content=json.dumps({"instances": x.tolist()}).encode())
        assert untyped.status_code == 415


def raw_predict_scope(client_port: int) -> dict[str, object]:
    """An ASGI scope for POST /predict, for tests that drive the app's receive and send by hand."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", client_port),
            "server": ("127.0.0.1", 8000)}  # fmt: skip


async def test_a_client_leaving_mid_body_is_a_499(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A disconnect while the body streams in is neither a 500 nor a traceback: one 499 in the metrics."""
    import logging

    async with serving(make_settings(tiny_bundle), FakeRunner()) as (client, app):
        messages = iter([{"type": "http.request", "body": b'{"instances": [[0.1, ', "more_body": True},
                         {"type": "http.disconnect"}])  # fmt: skip
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            return next(messages)

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = raw_predict_scope(5000)
        with caplog.at_level(logging.INFO):
            await app(scope, receive, send)
        assert sent[0]["status"] == 499
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        text = (await client.get("/metrics")).text
        assert metric_value(text, "gateway_request_duration_seconds_count", route="/predict", status="499") == 1
        assert 'status="500"' not in text


async def test_a_client_that_leaves_while_queued_costs_no_model_time(tiny_bundle: Path) -> None:
    """Its rows are dropped before their batch runs (a burst of abandoned requests must not stall the worker),
    and it counts as a 499."""
    runner = FakeRunner(delay_s=0.3)
    async with serving(make_settings(tiny_bundle), runner) as (client, app):
        warm = len(runner.batches)
        first = asyncio.create_task(client.post("/predict", json={"instances": rows(2)}))  # holds the worker
        await asyncio.sleep(0.1)
        left = asyncio.Event()
        body = json.dumps({"instances": rows(3)}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            if messages:
                return messages.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = raw_predict_scope(5001)
        gone = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.05)
        left.set()
        await gone
        assert sent[0]["status"] == 499
        assert (await first).status_code == 200
        assert (await client.post("/predict", json={"instances": rows(4)})).status_code == 200
        assert runner.batches[warm:] == [2, 4]  # the 3 rows never reached the model
        text = (await client.get("/metrics")).text
        assert metric_value(text, "gateway_request_duration_seconds_count", route="/predict", status="499") == 1


async def test_drain_answers_every_request_before_its_deadline(tiny_bundle: Path) -> None:
    """SIGTERM's drain: readiness is 503 at once; the running batch finishes (200); requests still queued at
    GATEWAY_DRAIN_TIMEOUT_S, and new ones, get 503 with Retry-After, so an ingress retries them elsewhere."""
    runner = FakeRunner(delay_s=0.4)
    async with serving(make_settings(tiny_bundle, drain_timeout_s=0.2, max_batch_size=2), runner) as (client, app):
        running = asyncio.create_task(client.post("/predict", json={"instances": rows(2)}))
        await asyncio.sleep(0.1)
        queued = [asyncio.create_task(client.post("/predict", json={"instances": rows(2)})) for _ in range(3)]
        await asyncio.sleep(0.02)
        app.state.gateway.begin_drain()
        assert (await client.get("/readyz")).status_code == 503
        late = await client.post("/predict", json={"instances": rows(1)})
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        answers = await asyncio.gather(*queued)
        assert [r.status_code for r in answers] == [503, 503, 503]
        assert all(r.headers["retry-after"] == "1" and "shutting down" in r.json()["error"] for r in answers)
        assert (await running).status_code == 200


async def test_request_ids_are_echoed_or_made_and_process_metrics_exported(tiny_bundle: Path) -> None:
    import sys

    async with serving(make_settings(tiny_bundle), FakeRunner()) as (client, _):
        given = await client.post("/predict", json={"instances": rows(1)}, headers={"X-Request-ID": "trace-42"})
        assert given.headers["x-request-id"] == "trace-42"
        made = await client.get("/healthz")
        assert len(made.headers["x-request-id"]) == 32
        unsafe = await client.get("/healthz", headers={"X-Request-ID": "x" * 500})
        assert unsafe.headers["x-request-id"] != "x" * 500  # it would land in logs: replaced
        error = await client.post("/predict", content=b"{", headers={**JSON, "X-Request-ID": "bad-body"})
        assert error.status_code == 400 and error.headers["x-request-id"] == "bad-body"
        if sys.platform == "linux":
            assert metric_value((await client.get("/metrics")).text, "process_resident_memory_bytes") > 0
