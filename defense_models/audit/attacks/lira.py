"""LiRA, the likelihood-ratio attack (Carlini et al., S&P 2022), on reference models.

Reference models train on random halves of a pool that contains the candidate records (``python -m
defense_models shadows``), so every record has reference outputs from models that saw it (IN) and
models that did not (OUT). The statistic is the logit-scaled confidence on the true label,
φ = log p_y − log(1 − p_y), which is close to Gaussian. For a record with released φ:

* online:  log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²)
* offline (OUT models only): (φ − μ_out) / σ_out, the one-sided test (higher = member).

[choices, following the paper's advice for few references: one global σ per side (pooled over
records) unless ``per_record_variance``; a record with no IN (or no OUT) reference gets the global
mean of that side.]
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

#: p_y is clipped into [EPS, 1 − EPS] before the logit (float64).
EPS = 1e-15


def logit_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, C], [N] -> [N] φ = log p_y − log Σ_{i≠y} p_i (stable for p_y near 1)."""
    p = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(p))
    py = np.clip(p[rows, labels], EPS, 1 - EPS)
    rest = np.clip(p.sum(axis=1) - p[rows, labels], EPS, None)
    return np.log(py) - np.log(rest)


class Lira:
    """Fit on reference φ [K, N] with IN masks [K, N]; score released φ [N] for the same N records."""

    name: ClassVar[str] = "lira"

    def __init__(self, online: bool = True, per_record_variance: bool = False) -> None:
        self.online = online
        self.per_record_variance = per_record_variance
        self._stats: tuple[np.ndarray, ...] | None = None

    @staticmethod
    def _side(phi: np.ndarray, mask: np.ndarray, per_record: bool) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std per record over the references where mask holds; [N], [N]."""
        count = mask.sum(axis=0)  # [N]
        total = np.where(mask, phi, 0.0).sum(axis=0)
        global_mean = total.sum() / max(count.sum(), 1)
        mean = np.where(count > 0, total / np.maximum(count, 1), global_mean)
        resid = np.where(mask, phi - mean[None, :], 0.0)
        global_std = np.sqrt((resid**2).sum() / max(count.sum() - 1, 1))
        if per_record:
            std = np.where(count > 1, np.sqrt((resid**2).sum(axis=0) / np.maximum(count - 1, 1)), global_std)
        else:
            std = np.full(phi.shape[1], global_std)
        return mean, np.maximum(std, 1e-6)

    def fit(self, phi: np.ndarray, in_mask: np.ndarray) -> None:
        phi, in_mask = np.asarray(phi, np.float64), np.asarray(in_mask, bool)
        if phi.shape != in_mask.shape or phi.ndim != 2:
            raise ValueError(f"reference φ {phi.shape} and IN masks {in_mask.shape} must both be [K, N]")
        self._stats = (*self._side(phi, in_mask, self.per_record_variance),
                       *self._side(phi, ~in_mask, self.per_record_variance))  # fmt: skip

    def score(self, phi: np.ndarray) -> np.ndarray:
        if self._stats is None:
            raise RuntimeError("fit the attack first")
        mu_in, sd_in, mu_out, sd_out = self._stats
        z_out = (np.asarray(phi, np.float64) - mu_out) / sd_out
        if not self.online:
            return z_out
        z_in = (phi - mu_in) / sd_in
        return -0.5 * z_in**2 - np.log(sd_in) + 0.5 * z_out**2 + np.log(sd_out)

    @classmethod
    def leave_one_out(cls, phi: np.ndarray, in_mask: np.ndarray, online: bool) -> tuple[np.ndarray, np.ndarray]:
        """The attacker's own calibration data: reference 0 plays the target, the others fit the
        attack; returns the scores of reference 0's IN records and of its OUT records."""
        attack = cls(online=online)
        attack.fit(phi[1:], in_mask[1:])
        s = attack.score(phi[0])
        return s[in_mask[0]], s[~in_mask[0]]


class LabelLira:
    """LiRA on the label alone: the likelihood ratio of the target's verdict (right or wrong on the record's
    true label) under the IN and OUT references' rates of being right, Laplace-smoothed
    (q = (right + 1) / (count + 2)). What any label-preserving defense still releases; its low-FPR tail is the
    yardstick for the other attacks' (docs/ALGORITHMS.md §5)."""

    name: ClassVar[str] = "lira_label"

    def __init__(self) -> None:
        self._q: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def _rate(right: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return (np.where(mask, right, False).sum(axis=0) + 1.0) / (mask.sum(axis=0) + 2.0)  # [N]

    def fit(self, right: np.ndarray, in_mask: np.ndarray) -> None:
        """right, in_mask [K, N] bool: reference k is right on record n; reference k trained on record n."""
        right, in_mask = np.asarray(right, bool), np.asarray(in_mask, bool)
        self._q = self._rate(right, in_mask), self._rate(right, ~in_mask)

    def score(self, right: np.ndarray) -> np.ndarray:
        """right [N] bool (the target's verdicts) -> log-likelihood ratio [N] (higher = member)."""
        if self._q is None:
            raise RuntimeError("fit the attack first")
        q_in, q_out = self._q
        return np.where(np.asarray(right, bool), np.log(q_in / q_out), np.log((1 - q_in) / (1 - q_out)))

    @classmethod
    def leave_one_out(cls, right: np.ndarray, in_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As ``Lira.leave_one_out``: reference 0 plays the target."""
        attack = cls()
        attack.fit(right[1:], in_mask[1:])
        s = attack.score(right[0])
        return s[in_mask[0]], s[~in_mask[0]]
