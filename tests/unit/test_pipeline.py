"""Pipeline: the fail-closed guard never releases a raw or broken row."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from gateway.defenses.identity import IdentityDefense
from gateway.defenses.keyed import RowKeyer
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from tests.conftest import CLASSES, WIDTH, FakeRunner, metric_value


class Broken:
    """A defense that misbehaves on chosen rows in a chosen way."""

    name: ClassVar[str] = "broken"
    randomized: ClassVar[bool] = False
    l1_bound = 0.5

    def __init__(self, mode: str, bad_rows: list[int]) -> None:
        self.mode, self.bad_rows = mode, bad_rows
        if mode == "too_far":
            self.l1_bound = 1e-3

    def params(self) -> dict[str, Any]:
        return {}

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.mode == "raise":
            raise RuntimeError("boom")
        out = probs.clone()
        for i in self.bad_rows:
            if self.mode == "nan":
                out[i, 0] = float("nan")
            elif self.mode == "negative":
                out[i] = probs[i] - 0.5
            elif self.mode == "off_simplex":
                out[i] = probs[i] * 2
            elif self.mode == "label":
                out[i] = torch.roll(probs[i], 1)
            elif self.mode == "too_far":  # label kept, on the simplex, L1 = 0.2(1 - p_top) > 1e-3
                top = int(probs[i].argmax())
                out[i] = 0.9 * probs[i]
                out[i, top] += 0.1
            elif self.mode == "tie":  # label tied with another class
                top = int(probs[i].argmax())
                out[i] = 0.0
                out[i, top] = out[i, (top + 1) % probs.shape[1]] = 0.5
        return out


def make(defense: Any, on_error: str = "reject", runner: FakeRunner | None = None, kind: str = "logits") -> Pipeline:
    return Pipeline(
        runner or FakeRunner(),
        defense,
        classes=CLASSES,
        output_kind=kind,  # type: ignore[arg-type]
        on_defense_error=on_error,
        metrics=GatewayMetrics(max_batch_size=8),  # type: ignore[arg-type]
        keyer=None,
        device=torch.device("cpu"),
    )


X = np.random.default_rng(3).normal(size=(6, WIDTH)).astype(np.float32)


def clean_probs() -> np.ndarray:
    logits = (X @ FakeRunner().W).astype(np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_identity_releases_the_clean_softmax_on_the_simplex() -> None:
    out = make(IdentityDefense())(X)
    np.testing.assert_allclose(out.probabilities, clean_probs(), atol=1e-6)
    assert np.abs(out.probabilities.sum(1) - 1).max() <= 1e-12
    assert out.labels.tolist() == clean_probs().argmax(1).tolist()
    assert not out.rejected.any()


@pytest.mark.parametrize("mode", ["nan", "negative", "off_simplex", "label", "too_far", "tie"])
@pytest.mark.parametrize("on_error", ["reject", "label_only"])
def test_bad_rows_never_leave_raw_or_broken(mode: str, on_error: str) -> None:
    pipe = make(Broken(mode, [1, 4]), on_error)
    out = pipe(X)
    clean = clean_probs()
    bad = [1, 4]
    good = [i for i in range(len(X)) if i not in bad]
    np.testing.assert_allclose(out.probabilities[good], clean[good], atol=1e-6)
    for i in bad:
        onehot = np.eye(CLASSES)[clean[i].argmax()]
        np.testing.assert_array_equal(out.probabilities[i], onehot)  # never the raw vector
    assert out.rejected.tolist() == [on_error == "reject" and i in bad for i in range(len(X))]
    text = generate_latest(pipe.metrics.registry).decode()
    assert metric_value(text, "gateway_defended_rows_total", defense="broken", outcome="fallback") == 2
    assert metric_value(text, "gateway_defended_rows_total", defense="broken", outcome="unchanged") == 4
    if mode == "label":
        assert metric_value(text, "gateway_label_changes_total", defense="broken") == 2


def test_a_defense_that_raises_fails_the_whole_batch_closed() -> None:
    out = make(Broken("raise", []), "label_only")(X)
    np.testing.assert_array_equal(out.probabilities, np.eye(CLASSES)[clean_probs().argmax(1)])
    assert not out.rejected.any()
    assert make(Broken("raise", []), "reject")(X).rejected.all()


def test_non_finite_model_output_is_rejected_even_in_label_only_mode() -> None:
    x = X.copy()
    x[2, 0] = FakeRunner.NAN_ROW
    out = make(IdentityDefense(), "label_only")(x)
    assert out.rejected.tolist() == [i == 2 for i in range(len(x))]
    assert np.isfinite(out.probabilities).all()


def test_probability_backends_are_renormalised_and_keep_labels() -> None:
    class ProbRunner(FakeRunner):
        def run(self, x: np.ndarray) -> np.ndarray:
            z = super().run(x).astype(np.float64)
            p = np.exp(z - z.max(1, keepdims=True))
            return (p / p.sum(1, keepdims=True)).astype(np.float32)

    out = make(IdentityDefense(), runner=ProbRunner(), kind="probabilities")(X)
    np.testing.assert_allclose(out.probabilities, clean_probs(), atol=1e-6)
    assert np.abs(out.probabilities.sum(1) - 1).max() <= 1e-12


def test_wrong_model_output_shape_raises() -> None:
    class Wrong(FakeRunner):
        def run(self, x: np.ndarray) -> np.ndarray:
            return super().run(x)[:, :2]

    with pytest.raises(RuntimeError, match="expected"):
        make(IdentityDefense(), runner=Wrong())(X)


def test_randomized_defense_requires_a_keyer() -> None:
    class NeedsKeys(Broken):
        randomized = True

    with pytest.raises(ValueError, match="RowKeyer"):
        make(NeedsKeys("nan", []))
    Pipeline(
        FakeRunner(),
        NeedsKeys("nan", []),
        classes=CLASSES,
        output_kind="logits",
        on_defense_error="reject",
        metrics=GatewayMetrics(max_batch_size=8),
        keyer=RowKeyer(b"s", b"c"),
        device=torch.device("cpu"),
    )
