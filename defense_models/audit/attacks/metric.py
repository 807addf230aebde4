"""Song & Mittal (USENIX Security 2021) metric attacks, and the gap attack (Yeom et al. 2018).

Natural logs; log 0 is taken as log 1e-30. Member iff metric ≥ τ_y, with a per-class threshold τ_c
fit on shadow data (the first maximiser of 0.5·(share of shadow members ≥ τ + share of shadow
non-members < τ)). The reference starts from τ = 0, so a class absent from the shadow data silently
gets τ = 0; here it gets the global threshold instead [choice, docs/ALGORITHMS.md §5]. Scores are
metric − τ_y, so 0 is the decision boundary and the ROC is meaningful across classes.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from defense_models.audit.attacks import register_attack
from defense_models.audit.attacks.base import AttackData
from defense_models.audit.scoring import best_threshold

LOG_FLOOR = 1e-30


def confidence(d: AttackData) -> np.ndarray:
    return d.probs[np.arange(len(d)), d.labels]


def neg_entropy(d: AttackData) -> np.ndarray:
    p = d.probs
    return np.sum(np.where(p > 0, p * np.log(np.maximum(p, LOG_FLOOR)), 0.0), axis=1)  # −H(p)


def neg_modified_entropy(d: AttackData) -> np.ndarray:
    """−Mentr, Mentr = −(1 − p_y) log p_y − Σ_{i≠y} p_i log(1 − p_i)."""
    p = d.probs
    rows = np.arange(len(d))
    py = p[rows, d.labels]
    log_p = np.log(np.maximum(p, LOG_FLOOR))
    log_1mp = np.log(np.maximum(1 - p, LOG_FLOOR))
    others = p * log_1mp
    others[rows, d.labels] = 0.0
    mentr = -(1 - py) * log_p[rows, d.labels] - others.sum(axis=1)
    return -mentr


class _ThresholdAttack:
    name: ClassVar[str]
    per_class: ClassVar[bool] = True

    def __init__(self) -> None:
        self.thresholds: dict[int, float] = {}
        self.global_threshold = 0.0

    @staticmethod
    def metric(d: AttackData) -> np.ndarray:
        raise NotImplementedError

    def fit(self, members: AttackData, nonmembers: AttackData) -> None:
        m, n = self.metric(members), self.metric(nonmembers)
        self.global_threshold = best_threshold(m, n)[0]
        self.thresholds = {}
        if self.per_class:
            for c in np.union1d(members.labels, nonmembers.labels):
                mc, nc = m[members.labels == c], n[nonmembers.labels == c]
                if mc.size and nc.size:
                    self.thresholds[int(c)] = best_threshold(mc, nc)[0]

    def score(self, data: AttackData) -> np.ndarray:
        tau = np.array([self.thresholds.get(int(c), self.global_threshold) for c in data.labels])
        tau = np.where(np.isfinite(tau), tau, self.global_threshold)
        return self.metric(data) - tau


@register_attack
class ConfidenceAttack(_ThresholdAttack):
    name = "confidence"
    metric = staticmethod(confidence)


@register_attack
class EntropyAttack(_ThresholdAttack):
    name = "entropy"
    metric = staticmethod(neg_entropy)


@register_attack
class ModifiedEntropyAttack(_ThresholdAttack):
    name = "modified_entropy"
    metric = staticmethod(neg_modified_entropy)


@register_attack
class GapAttack:
    """Member iff correctly classified. Its balanced accuracy is the label-only floor
    0.5 + (train_acc − test_acc)/2; no label-preserving defense changes it."""

    name: ClassVar[str] = "gap"
    reads_confidences: ClassVar[bool] = False

    def fit(self, members: AttackData, nonmembers: AttackData) -> None:
        pass

    def score(self, data: AttackData) -> np.ndarray:
        return (np.argmax(data.probs, axis=1) == data.labels).astype(np.float64)
