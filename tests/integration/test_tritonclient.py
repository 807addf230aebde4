"""Triton's own HTTP client (tritonclient 2.73) against a live gateway on 127.0.0.1: JSON and binary tensors,
FP32 and other input datatypes, requested outputs. The client sends no Content-Type and uses the binary tensor
data extension by default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import CLASSES, WIDTH, FakeRunner, live_gateway, make_settings

httpclient = pytest.importorskip("tritonclient.http")


@pytest.fixture
def live(tiny_bundle: Path) -> Iterator[tuple[Any, FakeRunner]]:
    """A gateway (defense `rounding`) on 127.0.0.1; yields a tritonclient and the model behind it."""
    runner = FakeRunner()
    with live_gateway(make_settings(tiny_bundle, defense="rounding"), runner) as url:
        client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
        try:
            yield client, runner
        finally:
            client.close()


def clean(runner: FakeRunner, x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float32) @ runner.W
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)  # type: ignore[no-any-return]


def infer(client: Any, x: np.ndarray, datatype: str, *, binary: bool, outputs: list[str] | None = None) -> Any:
    tensor = httpclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    requested = None if outputs is None else [httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs]
    return client.infer("tiny", [tensor], outputs=requested)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize(("dtype", "datatype"), [(np.float32, "FP32"), (np.float64, "FP64"), (np.int32, "INT32")])
def test_tritonclient_infers_with_every_wire_format(live: Any, binary: bool, dtype: Any, datatype: str) -> None:
    client, runner = live
    assert client.is_server_ready() and client.is_model_ready("tiny")
    x = (np.random.default_rng(0).random((3, WIDTH)) * 4).astype(dtype)
    result = infer(client, x, datatype, binary=binary)
    p, labels = result.as_numpy("probabilities"), result.as_numpy("labels")
    want = clean(runner, x)
    assert p.shape == (3, CLASSES) and labels.tolist() == want.argmax(1).tolist()
    assert np.abs(p.sum(1) - 1).max() <= 1e-6 and np.abs(p - want).max() <= 0.05  # defended (rounded), not raw


def test_tritonclient_gets_only_the_outputs_it_asks_for(live: Any) -> None:
    client, _ = live
    x = np.random.default_rng(1).random((2, WIDTH)).astype(np.float32)
    result = infer(client, x, "FP32", binary=True, outputs=["labels"])
    assert result.as_numpy("probabilities") is None and result.as_numpy("labels").shape == (2,)
    with pytest.raises(Exception, match="unknown output"):
        infer(client, x, "FP32", binary=False, outputs=["logits"])


def test_tritonclient_bool_inputs_are_cast(live: Any) -> None:
    client, runner = live
    x = np.random.default_rng(2).random((2, WIDTH)) < 0.3
    for binary in (True, False):
        labels = infer(client, x, "BOOL", binary=binary).as_numpy("labels")
        assert labels.tolist() == clean(runner, x).argmax(1).tolist()
