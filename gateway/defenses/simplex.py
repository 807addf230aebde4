"""Simplex helpers shared by the pipeline and the defenses."""

from __future__ import annotations

import torch

#: Floor inside log() when a probability-only backend must be turned into logits.
LOG_FLOOR = 1e-30
#: How far a defense's row sum may drift before the pipeline's float64 renormalisation.
SUM_TOLERANCE = 1e-4
#: Slack on the per-row L1 bound (float32 arithmetic inside defenses).
L1_TOLERANCE = 1e-5


def logits_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """probs[B, C] -> logits[B, C] with the same softmax (softmax is shift-invariant)."""
    return torch.log(probs.clamp_min(LOG_FLOOR))


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """labels[B] -> one-hot[B, C] float64: the label-only fallback vector."""
    return torch.nn.functional.one_hot(labels, classes).to(torch.float64)


def row_violations(released: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor, l1_bound: float) -> torch.Tensor:
    """released, clean [B, C] float64; labels [B] -> bad[B]: rows that must not be released.

    A row is bad when it is non-finite, has a negative entry, does not sum to 1 (±SUM_TOLERANCE),
    changes the label (first index of the maximum) or moves further than ``l1_bound`` in L1.
    """
    finite = torch.isfinite(released).all(dim=1)  # [B]
    safe = torch.where(torch.isfinite(released), released, torch.zeros_like(released))  # [B, C]
    nonneg = (safe >= 0).all(dim=1)
    sums_ok = (safe.sum(dim=1) - 1).abs() <= SUM_TOLERANCE
    same_label = safe.argmax(dim=1) == labels
    # A changed row must have the label as its strict maximum, so every client's argmax agrees;
    # a row released unchanged keeps the clean vector's tie-break (first index).
    unchanged = (safe == clean).all(dim=1)  # [B]
    top = safe.gather(1, labels[:, None])[:, 0]  # [B]
    others = safe.scatter(1, labels[:, None], float("-inf")).amax(dim=1)  # [B]
    strict = unchanged | (top > others)
    within = (safe - clean).abs().sum(dim=1) <= l1_bound + L1_TOLERANCE
    return ~(finite & nonneg & sums_ok & same_label & strict & within)
