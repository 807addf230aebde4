"""Attack and utility metrics (docs/ALGORITHMS.md §6), in numpy.

Convention: a higher score means "more likely a member"; the attack says member iff score ≥ τ.
Member sets and non-member sets are scored separately, so nothing here assumes balance, but the
audit uses balanced sets and reports balanced accuracy, 0.5·(TPR + TNR).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Roc:
    fpr: np.ndarray  # [K] non-decreasing, from 0 to 1
    tpr: np.ndarray  # [K]
    thresholds: np.ndarray  # [K] member iff score >= threshold (first point: +inf, nobody)


def roc(members: np.ndarray, nonmembers: np.ndarray) -> Roc:
    """The full ROC, one point per distinct score (ties move together)."""
    m = np.asarray(members, dtype=np.float64)
    n = np.asarray(nonmembers, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("ROC needs at least one member and one non-member score")
    thresholds = np.unique(np.concatenate([m, n]))[::-1]  # descending distinct scores
    m_sorted, n_sorted = np.sort(m), np.sort(n)
    tpr = (m.size - np.searchsorted(m_sorted, thresholds, side="left")) / m.size  # share ≥ τ
    fpr = (n.size - np.searchsorted(n_sorted, thresholds, side="left")) / n.size
    return Roc(np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]), np.concatenate([[np.inf], thresholds]))


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Area under the ROC = P(member score > non-member score) + ½·P(tie)."""
    r = roc(members, nonmembers)
    return float(np.trapezoid(r.tpr, r.fpr))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, max_fpr: float) -> float:
    """The largest TPR among thresholds with FPR ≤ max_fpr (resolution: 1/len(nonmembers))."""
    r = roc(members, nonmembers)
    return float(r.tpr[r.fpr <= max_fpr + 1e-12].max())


def tpr_above_kth(members: np.ndarray, nonmembers: np.ndarray, max_fpr: float) -> np.ndarray:
    """``tpr_at_fpr`` of many score sets at once: members [B, M], non-members [B, N] -> TPR [B].

    A threshold may pass at most k = ⌊max_fpr·N⌋ non-members, so the best one sits just above the (k+1)-th
    largest non-member score v: TPR = share of members > v (ties with v stay out, as in the ROC)."""
    k = int(np.floor(max_fpr * nonmembers.shape[1] + 1e-9))
    if k >= nonmembers.shape[1]:
        return np.ones(members.shape[0])
    kth = nonmembers.shape[1] - 1 - k
    v = np.partition(nonmembers, kth, axis=1)[:, kth]  # [B]
    return (members > v[:, None]).mean(axis=1)


#: the bootstrap behind every TPR interval: resamples, seed, and resamples per chunk (memory: chunk × rows)
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, BOOTSTRAP_CHUNK = 1_000, 0, 100


def tpr_interval(members: np.ndarray, nonmembers: np.ndarray, max_fpr: float,
                 level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """A seeded percentile-bootstrap interval for ``tpr_at_fpr``: members and non-members resampled
    independently. At 0.1% FPR the threshold is set by the top one or two non-members, so the interval is wide
    unless there are many thousands of them."""
    m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    tprs = []
    for start in range(0, BOOTSTRAP_RESAMPLES, BOOTSTRAP_CHUNK):
        b = min(BOOTSTRAP_CHUNK, BOOTSTRAP_RESAMPLES - start)
        tprs.append(tpr_above_kth(m[rng.integers(0, m.size, (b, m.size))], n[rng.integers(0, n.size, (b, n.size))],
                                  max_fpr))  # fmt: skip
    low, high = np.percentile(np.concatenate(tprs), [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def balanced_accuracy_at(members: np.ndarray, nonmembers: np.ndarray, threshold: float) -> float:
    m, n = np.asarray(members), np.asarray(nonmembers)
    return float(0.5 * ((m >= threshold).mean() + (n < threshold).mean()))


def best_threshold(members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, float]:
    """(τ, balanced accuracy) maximising 0.5·(TPR + TNR); the first (highest τ) maximum wins."""
    r = roc(members, nonmembers)
    bacc = 0.5 * (r.tpr + 1 - r.fpr)
    i = int(np.argmax(bacc >= bacc.max() - 1e-12))  # first maximum, robust to rounding
    return float(r.thresholds[i]), float(bacc[i])


@dataclass(frozen=True)
class AttackScores:
    balanced_accuracy: float  # threshold tuned on shadow data
    oracle_balanced_accuracy: float  # best threshold on the evaluation sets (an upper bound)
    precision: float
    recall: float
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    tpr_at_01pct_fpr_low: float  # its 95% bootstrap interval (``tpr_interval``)
    tpr_at_01pct_fpr_high: float
    advantage: float  # max(TPR − FPR)
    threshold: float
    n_members: int
    n_nonmembers: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_attack(
    members: np.ndarray, nonmembers: np.ndarray, *, shadow: tuple[np.ndarray, np.ndarray] | None = None
) -> AttackScores:
    """Score an attack's outputs on evaluation members and non-members.

    The decision threshold comes from ``shadow`` (member, non-member scores on the attacker's own
    data) when given, else it is the oracle's.
    """
    m, n = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    tau_oracle, oracle = best_threshold(m, n)
    tau = best_threshold(*shadow)[0] if shadow is not None else tau_oracle
    tp, fp = float((m >= tau).sum()), float((n >= tau).sum())
    r = roc(m, n)
    low, high = tpr_interval(m, n, 0.001)
    return AttackScores(
        balanced_accuracy=balanced_accuracy_at(m, n, tau),
        oracle_balanced_accuracy=oracle,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / m.size,
        auc=auc(m, n),
        tpr_at_1pct_fpr=tpr_at_fpr(m, n, 0.01),
        tpr_at_01pct_fpr=tpr_at_fpr(m, n, 0.001),
        tpr_at_01pct_fpr_low=low,
        tpr_at_01pct_fpr_high=high,
        advantage=float((r.tpr - r.fpr).max()),
        threshold=tau,
        n_members=int(m.size),
        n_nonmembers=int(n.size),
    )


# --- utility ------------------------------------------------------------------------------------
def l1_stats(released: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """Per-row ‖released − clean‖₁: mean, median, p90, p99, max."""
    d = np.abs(np.asarray(released, np.float64) - np.asarray(clean, np.float64)).sum(axis=1)
    return {
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "p90": float(np.quantile(d, 0.9)),
        "p99": float(np.quantile(d, 0.99)),
        "max": float(d.max()),
    }


def label_loss(released: np.ndarray, clean: np.ndarray) -> float:
    """Share of rows whose argmax changed; every output defense must keep it at exactly 0."""
    return float((np.argmax(released, axis=1) != np.argmax(clean, axis=1)).mean())


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(probs, axis=1) == np.asarray(labels)).mean())


def gap_floor(train_accuracy: float, test_accuracy: float) -> float:
    """The label-only floor: the gap attack's balanced accuracy, 0.5 + (train − test)/2 (docs/ALGORITHMS.md §7)."""
    return 0.5 + (train_accuracy - test_accuracy) / 2


# --- what a defense costs the model's users (on non-members, against their true labels) -------------
def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true label is among the k largest entries of probs [N, C] (first index on ties)."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # [N, k]
    return float((order == labels[:, None]).any(axis=1).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: Σ_b (n_b / N)·|accuracy_b − mean confidence_b| over equal-width bins of the top probability."""
    conf = probs.max(axis=1)  # [N]
    correct = probs.argmax(axis=1) == labels  # [N]
    which = np.minimum((conf * bins).astype(int), bins - 1)  # [N] bin index
    total = 0.0
    for b in np.unique(which):
        rows = which == b
        total += rows.mean() * abs(correct[rows].mean() - conf[rows].mean())
    return float(total)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, floor: float = 1e-12) -> float:
    """Mean −log p[true label], the probability floored at ``floor`` (a zero would make it infinite)."""
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], floor)).mean())
