"""Losses that change what a replacement is trained to output, not how hard it fits the labels.

* HAMP (Chen & Pattabiraman, NDSS 2024): train on high-entropy soft labels, the true class at probability p
  and the rest sharing 1 − p, with p set so a label's entropy is γ·ln C; loss KL(soft ‖ model) − α·H(model).
  ``kl_reduction="elements"`` averages the KL over batch × classes, as the authors' ``F.kl_div`` default does
  (so their α = 0.001 weighs the entropy term C times more than under a per-row mean, "rows").
* RelaxLoss (Chen, Yu & Fritz, ICLR 2022): a target loss level α. Even epochs descend on |CE − α| (gradient
  ascent once the loss is below α); odd epochs descend on CE while it is above α, else on posterior
  flattening: a soft target keeping the model's own true-class probability (capped at ``upper``) and
  sharing the rest equally, through which the gradient also flows, as in the authors' code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gateway.registry import ParameterError


def label_entropy(p: float, classes: int) -> float:
    """Entropy (nats) of the label with the true class at p and the others at (1 − p)/(C − 1)."""
    rest = (1 - p) / (classes - 1)
    return -(p * math.log(p) if p > 0 else 0.0) - (classes - 1) * (rest * math.log(rest) if rest > 0 else 0.0)


def true_class_probability(gamma: float, classes: int) -> float:
    """The p whose label entropy is γ·ln C (0 < γ < 1), by bisection on [1/C, 1] (entropy falls as p rises)."""
    if not 0 < gamma < 1:
        raise ParameterError(f"HAMP's gamma must be in (0, 1), got {gamma}")
    target, lo, hi = gamma * math.log(classes), 1.0 / classes, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if label_entropy(mid, classes) > target else (lo, mid)
    return (lo + hi) / 2


class HampLoss(nn.Module):
    """logits [B, C], labels [B] -> KL(soft label ‖ softmax) − α·mean entropy(softmax)."""

    table: torch.Tensor  # [C, C] row y: the soft label of class y

    def __init__(self, classes: int, gamma: float, alpha: float, kl_reduction: str = "elements") -> None:
        super().__init__()
        if kl_reduction not in ("elements", "rows"):
            raise ParameterError(f"HAMP's kl_reduction is 'elements' or 'rows', got {kl_reduction!r}")
        self.p = true_class_probability(gamma, classes)
        rest = (1 - self.p) / (classes - 1)
        self.register_buffer("table", torch.full((classes, classes), rest).fill_diagonal_(self.p))  # [C, C]
        self.alpha, self.kl_reduction = alpha, kl_reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        soft = self.table[labels]  # [B, C]
        logp = F.log_softmax(logits, dim=1)  # [B, C]
        kl = (soft * (soft.log() - logp)).sum()
        kl = kl / logits.numel() if self.kl_reduction == "elements" else kl / logits.shape[0]
        entropy = -(logp.exp() * logp).sum(dim=1).mean()
        return kl - self.alpha * entropy


class RelaxLoss(nn.Module):
    """logits [B, C], labels [B] -> the loss of the current epoch (``epoch`` is set by the training loop)."""

    def __init__(self, classes: int, alpha: float, upper: float = 1.0) -> None:
        super().__init__()
        self.classes, self.alpha, self.upper = classes, alpha, upper
        self.epoch = 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        if self.epoch % 2 == 0:
            return (ce - self.alpha).abs()
        if ce > self.alpha:
            return ce
        p_true = logits.softmax(dim=1).gather(1, labels[:, None]).clamp(max=self.upper)  # [B, 1]
        onehot = F.one_hot(labels, self.classes).to(logits.dtype)  # [B, C]
        soft = onehot * p_true + (1 - onehot) * (1 - p_true) / (self.classes - 1)  # [B, C]
        return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
