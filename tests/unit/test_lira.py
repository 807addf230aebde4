"""LiRA's statistics on a synthetic population where members' φ is shifted."""

from __future__ import annotations

import numpy as np
import pytest

from defense_models.audit.attacks.lira import LabelLira, Lira, logit_confidence
from defense_models.audit.scoring import score_attack


def population(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """φ [K, N] of K references (IN with prob. ½), per-record difficulty, IN shift +2."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 3, n)  # records differ a lot: the per-record mean matters
    mask = rng.random((k, n)) < 0.5
    phi = difficulty[None, :] + 2.0 * mask + rng.normal(0, 1, (k, n))
    return phi, mask, difficulty


def test_logit_confidence_matches_the_definition_and_is_stable() -> None:
    p = np.array([[0.7, 0.2, 0.1], [1 - 1e-20, 1e-20, 0.0]])
    phi = logit_confidence(p, np.array([0, 0]))
    assert phi[0] == pytest.approx(np.log(0.7 / 0.3))
    assert np.isfinite(phi[1]) and phi[1] > 30


@pytest.mark.parametrize("online", [True, False])
def test_lira_uses_the_per_record_reference_distribution(online: bool) -> None:
    phi, mask, difficulty = population(32, 2000, 0)
    attack = Lira(online=online)
    attack.fit(phi, mask)
    rng = np.random.default_rng(1)
    target_in = rng.random(2000) < 0.5
    target_phi = difficulty + 2.0 * target_in + rng.normal(0, 1, 2000)
    s = attack.score(target_phi)
    lira = score_attack(s[target_in], s[~target_in])
    naive = score_attack(target_phi[target_in], target_phi[~target_in])  # a global threshold on φ
    assert lira.auc > 0.85 > naive.auc + 0.15
    loo_in, loo_out = Lira.leave_one_out(phi, mask, online)
    assert len(loo_in) + len(loo_out) == 2000 and score_attack(loo_in, loo_out).auc > 0.85


def test_lira_records_without_in_references_fall_back_to_the_global_mean() -> None:
    phi, mask, _ = population(4, 50, 2)
    mask[:, 0] = False
    attack = Lira()
    attack.fit(phi, mask)
    assert np.isfinite(attack.score(phi[0])).all()


def test_label_lira_reads_how_often_references_get_a_record_right() -> None:
    """Hard records (OUT references rarely right) that the target gets right are members: the label alone."""
    rng = np.random.default_rng(3)
    k, n = 16, 3000
    mask = rng.random((k, n)) < 0.5
    p_out = rng.uniform(0.05, 0.95, n)  # how often a model that did not train on the record gets it right
    p_in = np.maximum(p_out, 0.97)  # training on it makes a model right almost always
    right = rng.random((k, n)) < np.where(mask, p_in, p_out)
    attack = LabelLira()
    attack.fit(right, mask)
    target_in = rng.random(n) < 0.5
    target_right = rng.random(n) < np.where(target_in, p_in, p_out)
    s = attack.score(target_right)
    lira = score_attack(s[target_in], s[~target_in])
    gap = score_attack(target_right[target_in].astype(float), target_right[~target_in].astype(float))
    assert lira.auc > gap.auc + 0.05 and lira.tpr_at_1pct_fpr > gap.tpr_at_1pct_fpr
    loo_in, loo_out = LabelLira.leave_one_out(right, mask)
    assert len(loo_in) + len(loo_out) == n and np.isfinite(np.concatenate([loo_in, loo_out])).all()
