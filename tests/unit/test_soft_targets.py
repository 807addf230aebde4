"""HAMP's and RelaxLoss' training losses (defense_models/training/soft_targets.py)."""

from __future__ import annotations

import math

import pytest
import torch

from defense_models.training.soft_targets import HampLoss, RelaxLoss, label_entropy, true_class_probability


@pytest.mark.parametrize(("gamma", "classes"), [(0.5, 30), (0.95, 30), (0.3, 10), (0.8, 100)])
def test_the_soft_labels_entropy_is_gamma_of_the_maximum(gamma: float, classes: int) -> None:
    p = true_class_probability(gamma, classes)
    assert 1 / classes < p < 1
    assert label_entropy(p, classes) == pytest.approx(gamma * math.log(classes), abs=1e-9)


def test_location30_settings_give_the_published_true_class_probability() -> None:
    assert true_class_probability(0.5, 30) == pytest.approx(0.68, abs=0.01)  # the p ≈ 0.68


def test_hamp_loss_is_smallest_at_its_soft_label_and_reductions_differ_by_c() -> None:
    C = 30
    labels = torch.tensor([0, 5, 29])
    loss = HampLoss(C, gamma=0.5, alpha=0.0)
    at_label = loss.table[labels].log().clone().requires_grad_(True)  # logits whose softmax is the soft label
    value = loss(at_label, labels)
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6) and float(at_label.grad.abs().max()) < 1e-6  # type: ignore[union-attr]
    logits = torch.randn(3, C)
    rows = HampLoss(C, gamma=0.5, alpha=0.0, kl_reduction="rows")
    assert float(rows(logits, labels)) == pytest.approx(float(loss(logits, labels)) * C, rel=1e-5)
    entropic = HampLoss(C, gamma=0.5, alpha=0.1)
    h = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    assert float(entropic(logits, labels)) == pytest.approx(float(loss(logits, labels)) - 0.1 * float(h), rel=1e-5)


def test_relaxloss_ascends_below_alpha_on_even_epochs_and_flattens_on_odd_ones() -> None:
    labels = torch.tensor([1, 2])
    confident = torch.tensor([[0.0, 8.0, 0.0], [0.0, 0.0, 8.0]], requires_grad=True)  # CE ≈ 0.0007 < α
    loss = RelaxLoss(3, alpha=0.5)
    ce = torch.nn.functional.cross_entropy(confident, labels)
    (g_ce,) = torch.autograd.grad(ce, confident)
    (g_even,) = torch.autograd.grad(loss(confident, labels), confident)
    assert torch.allclose(g_even, -g_ce)  # |CE − α| below α: gradient ascent on CE
    loss.epoch = 1
    loose = torch.zeros(2, 3)  # CE = ln 3 > α: plain cross-entropy
    assert float(loss(loose, labels)) == pytest.approx(math.log(3), rel=1e-6)
    capped = RelaxLoss(3, alpha=0.5, upper=0.6)
    capped.epoch = 1
    z = confident[:1].detach()
    target = torch.tensor([0.2, 0.6, 0.2])  # the true class capped at 0.6, the other two share the rest
    assert float(capped(z, labels[:1])) == pytest.approx(float(-(target * z.log_softmax(1)[0]).sum()), rel=1e-5)
