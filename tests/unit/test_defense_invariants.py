"""Hypothesis: every defense keeps the label and releases a valid distribution, for any batch."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.defenses import Defense
from gateway.defenses.aeppt import Aeppt, AepptParams
from gateway.defenses.classifier import AepptSubstitute, MemGuardClassifier
from gateway.defenses.identity import IdentityDefense
from gateway.defenses.memguard import MemGuard, MemGuardParams
from gateway.defenses.postprocess import (
    Gaussian,
    GaussianParams,
    LabelOnly,
    NoParams,
    Rounding,
    RoundingParams,
    Temperature,
    TemperatureParams,
    TopK,
    TopKParams,
)
from gateway.defenses.simplex import L1_TOLERANCE
from tests.conftest import hamp_defense, keys_for, template_defense

CPU = torch.device("cpu")
NAMES = ["none", "memguard", "memguard_boundary", "aeppt", "topk", "rounding", "temperature", "label_only", "gaussian",
         "rank_template", "hamp"]  # fmt: skip


@functools.cache
def make(name: str, classes: int) -> Defense:
    torch.manual_seed(classes)
    if name.startswith("memguard"):
        landing = "boundary" if name == "memguard_boundary" else "crossed"
        return MemGuard(MemGuardClassifier(classes), MemGuardParams(landing=landing), CPU)
    if name in ("rank_template", "hamp"):
        return template_defense(classes) if name == "rank_template" else hamp_defense(classes)
    if name == "aeppt":
        return Aeppt(AepptSubstitute(classes), AepptParams(step_size=0.01), CPU)
    return {
        "none": lambda: IdentityDefense(),
        "topk": lambda: TopK(TopKParams(k=2)),
        "rounding": lambda: Rounding(RoundingParams(decimals=2)),
        "temperature": lambda: Temperature(TemperatureParams(temperature=3.0)),
        "label_only": lambda: LabelOnly(NoParams()),
        "gaussian": lambda: Gaussian(GaussianParams(sigma=0.1)),
    }[name]()


@st.composite
def logit_batches(draw: Any) -> np.ndarray:
    b = draw(st.sampled_from([0, 1, 2, draw(st.integers(3, 24))]))
    c = draw(st.integers(2, 100))
    scale = draw(st.sampled_from([1e-3, 1.0, 5.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    z = np.random.default_rng(seed).normal(size=(b, c)) * scale
    if b and draw(st.booleans()):  # exact ties at the top for some rows
        rows = np.arange(b) % 2 == 0
        top = z.argmax(1)
        z[rows, (top[rows] + 1) % c] = z[rows, top[rows]]
    if b and draw(st.booleans()):  # a row of identical logits
        z[0] = 0.0
    return z.astype(np.float32)


def check(defense: Defense, z: np.ndarray) -> None:
    logits = torch.from_numpy(z)
    probs = torch.softmax(logits.double(), dim=1)  # [B, C]
    labels = probs.argmax(dim=1)
    out = defense.defend(probs, logits, keys_for(z))
    assert out.shape == probs.shape
    out = out.double()
    assert torch.isfinite(out).all()
    assert (out >= 0).all()
    assert ((out.sum(1) - 1).abs() <= 1e-6).all()
    assert torch.equal(out.argmax(1), labels), "label changed"
    changed = (out != probs).any(1)
    top = out.gather(1, labels[:, None])[:, 0]
    rest = out.scatter(1, labels[:, None], float("-inf")).amax(1) if out.shape[1] > 1 else top - 1
    assert (~changed | (top > rest)).all(), "a changed row must have its label as the strict maximum"
    assert ((out - probs).abs().sum(1) <= defense.l1_bound + L1_TOLERANCE).all()
    again = defense.defend(probs, logits, keys_for(z)).double()
    assert torch.equal(out, again), "same rows, same keys, different answer"


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(z=logit_batches())
def test_invariants(name: str, z: np.ndarray) -> None:
    check(make(name, max(z.shape[1], 2)), z)


def test_memguard_with_official_schedule_on_extreme_rows(defenders: dict[str, Any]) -> None:
    z = np.array([[1e4, 0, 0, 0, 0, 0, 0, 0, 0, -1e4], [0.0] * 10, [3, 3, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    check(MemGuard(defenders["g"], MemGuardParams(), CPU), z)


def test_flush_subnormals_nests_and_restores() -> None:
    """The defenses run with subnormals flushed (x86 FTZ/DAZ; ``base.flush_subnormals``): inside, nested or
    not, a subnormal reads as 0; after the outermost exit the thread is back to IEEE."""
    from gateway.defenses.base import flush_subnormals

    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32

    def product() -> float:
        return float((tiny * 1.0)[0])

    if product() == 0:
        pytest.skip("this CPU or build flushes subnormals already")
    with flush_subnormals():
        with flush_subnormals():
            assert product() == 0
        assert product() == 0  # the inner exit leaves the outer one's setting
    assert product() > 0
