"""Baseline post-processors: what each one does, beyond the shared invariants."""

from __future__ import annotations

import torch

from gateway.defenses.postprocess import (
    LabelOnly,
    NoParams,
    Rounding,
    RoundingParams,
    Temperature,
    TemperatureParams,
    TopK,
    TopKParams,
)

P = torch.tensor([[0.52, 0.31, 0.13, 0.04], [0.004, 0.996, 0.0, 0.0]], dtype=torch.float64)
Z = torch.log(P.clamp_min(1e-30)).float()
K = torch.zeros(2, 32, dtype=torch.uint8)


def test_topk_keeps_the_k_largest() -> None:
    out = TopK(TopKParams(k=2)).defend(P, Z, K)
    torch.testing.assert_close(out[0], torch.tensor([0.52, 0.31, 0, 0], dtype=torch.float64) / 0.83)


def test_rounding_rounds_then_renormalises_and_keeps_a_tied_label() -> None:
    out = Rounding(RoundingParams(decimals=1)).defend(P, Z, K)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.3, 0.1, 0.0], dtype=torch.float64) / 0.9)
    tie = torch.tensor([[0.46, 0.44, 0.1]], dtype=torch.float64)  # 0.46 and 0.44 both round to 0: label kept
    r = Rounding(RoundingParams(decimals=0)).defend(tie, torch.log(tie).float(), K[:1])
    assert r.argmax(1).item() == 0 and r[0, 0] > r[0, 1]


def test_temperature_flattens_and_label_only_is_one_hot() -> None:
    hot = Temperature(TemperatureParams(temperature=4.0)).defend(P, Z, K)
    assert (hot.max(1).values < P.max(1).values).all() and torch.equal(hot.argmax(1), P.argmax(1))
    torch.testing.assert_close(LabelOnly(NoParams()).defend(P, Z, K), torch.eye(4, dtype=torch.float64)[[0, 1]])
