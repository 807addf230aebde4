"""Metric functions against hand-computed cases (ties included)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defense_models.audit.scoring import (
    auc,
    balanced_accuracy_at,
    best_threshold,
    gap_floor,
    l1_stats,
    label_loss,
    roc,
    score_attack,
    tpr_above_kth,
    tpr_at_fpr,
    tpr_interval,
)


def test_roc_with_ties() -> None:
    r = roc(np.array([3, 2, 2, 1]), np.array([2, 1, 0, 0]))
    # thresholds +inf, 3, 2, 1, 0 -> TPR 0, .25, .75, 1, 1 and FPR 0, 0, .25, .5, 1
    assert r.thresholds.tolist() == [np.inf, 3, 2, 1, 0]
    assert r.tpr.tolist() == [0, 0.25, 0.75, 1, 1]
    assert r.fpr.tolist() == [0, 0, 0.25, 0.5, 1]


def test_auc_counts_ties_as_half() -> None:
    # pairs (m, n): 16; m > n in 12 cases, ties in 3 (2 vs 2 twice, 1 vs 1 once), m < n in 1
    assert auc(np.array([3, 2, 2, 1]), np.array([2, 1, 0, 0])) == pytest.approx((12 + 1.5) / 16)
    assert auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert auc(np.array([2.0]), np.array([1.0])) == 1.0


def test_tpr_at_low_fpr_takes_the_best_point_within_budget() -> None:
    members = np.array([10, 9, 8, 1])
    nonmembers = np.concatenate([[9.5], np.zeros(999)])  # one non-member scores high
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.25  # only τ = 10 has FPR 0
    assert tpr_at_fpr(members, nonmembers, 0.001) == 1.0  # FPR 1/1000 is allowed: τ = 1
    assert tpr_at_fpr(members, nonmembers, 0.0009) == 0.25


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40), st.lists(st.integers(0, 6), min_size=1, max_size=40),
       st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 1.0]))  # fmt: skip
def test_the_bootstraps_tpr_is_the_rocs(m: list[int], n: list[int], max_fpr: float) -> None:
    """The bootstrap's vectorised TPR equals tpr_at_fpr's on the full ROC, ties included."""
    a, b = np.array(m, float), np.array(n, float)
    assert tpr_above_kth(a[None], b[None], max_fpr)[0] == pytest.approx(tpr_at_fpr(a, b, max_fpr))


def test_the_tpr_interval_is_seeded_and_holds_the_estimate() -> None:
    rng = np.random.default_rng(3)
    members, nonmembers = rng.normal(0.3, 1, 1000), rng.normal(0, 1, 1000)
    low, high = tpr_interval(members, nonmembers, 0.001)
    assert low <= tpr_at_fpr(members, nonmembers, 0.001) <= high and 0 <= low < high <= 1
    assert tpr_interval(members, nonmembers, 0.001) == (low, high)  # seeded: a re-audit reads the same
    s = score_attack(members, nonmembers)
    assert (s.tpr_at_01pct_fpr_low, s.tpr_at_01pct_fpr_high) == (low, high)
    wide = tpr_interval(members[:100], nonmembers[:100], 0.001)
    assert wide[1] - wide[0] > high - low  # fewer rows, a wider interval


def test_balanced_accuracy_and_thresholds() -> None:
    m, n = np.array([0.9, 0.8, 0.4]), np.array([0.5, 0.3, 0.2])
    assert balanced_accuracy_at(m, n, 0.6) == pytest.approx(0.5 * (2 / 3 + 1))
    tau, bacc = best_threshold(m, n)
    assert (tau, bacc) == (0.8, pytest.approx(0.5 * (2 / 3 + 1)))  # the first (highest τ) maximum
    s = score_attack(m, n, shadow=(np.array([1.0]), np.array([0.0])))  # shadow picks τ = 1: nobody
    assert s.balanced_accuracy == 0.5 and s.oracle_balanced_accuracy == pytest.approx(5 / 6)
    assert s.recall == 0 and s.precision == 0 and s.n_members == 3


def test_a_constant_attack_is_at_chance() -> None:
    s = score_attack(np.ones(100), np.ones(100))
    assert s.auc == 0.5 and s.oracle_balanced_accuracy == 0.5 and s.advantage == 0 and s.tpr_at_01pct_fpr == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.lists(st.integers(0, 5), min_size=1, max_size=30))
def test_auc_equals_the_pairwise_probability(m: list[int], n: list[int]) -> None:
    a, b = np.array(m, float), np.array(n, float)
    pairwise = ((a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()) / (a.size * b.size)
    assert auc(a, b) == pytest.approx(pairwise)


def test_utility_metrics() -> None:
    clean = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    released = np.array([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]])
    stats = l1_stats(released, clean)
    assert stats["mean"] == pytest.approx((0.2 + 0.6) / 2) and stats["max"] == pytest.approx(0.6)
    assert label_loss(released, clean) == 0.5
    assert gap_floor(1.0, 0.6) == pytest.approx(0.7)
