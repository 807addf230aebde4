"""The defender's classifiers: recipes that learn on unbalanced, saturated outputs; the quality gate's rules."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defense_models.audit.scoring import balanced_accuracy_at
from defense_models.bundle.quality import (
    MIN_BALANCED_ACCURACY,
    MIN_PERTURBED_FLAGGED,
    WeakDefenseError,
    enforce,
    problems,
)
from defense_models.training.defenders import (
    DEFENDER_RECIPES,
    fold_standardization,
    holdout,
    train_memguard_classifier,
    train_substitute,
)
from gateway.artifacts import DefenseQuality


def saturated(n: int, classes: int, member: bool, seed: int, extreme: bool = False) -> torch.Tensor:
    """Softmax rows [n, C]: members' top probability 1 − 1e-4 … 1 − 1e-2 (extreme: 1 − 1e-7 … 1 − 1e-4),
    non-members' 0.5 … 0.99 (extreme: … 0.999)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    tail = torch.rand(n, classes, generator=g, dtype=torch.float64) + 0.1  # [n, C]
    tail[torch.arange(n), y] = 0
    lo, hi = ((1e-7, 1e-4) if member else (1e-3, 0.5)) if extreme else ((1e-4, 1e-2) if member else (1e-2, 0.5))
    mass = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(np.log(lo), np.log(hi), generator=g))  # [n]
    p = tail / tail.sum(1, keepdim=True) * mass[:, None]
    p[torch.arange(n), y] = 1 - mass
    return p


@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_folding_the_standardization_is_exact(n_out: int, n_in: int, seed: int) -> None:
    """layer(x) after folding equals the trained layer on (x − mean)/scale, within float32 rounding."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(n_in, n_out).double()
    x = torch.randn(16, n_in, dtype=torch.float64) * 1e-3 + 0.5
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-8)
    want = layer((x - mean) / scale)
    fold_standardization(layer, mean, scale)
    torch.testing.assert_close(layer(x), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("recipe", "extreme"), [("robust", False), ("saturated", True)])
@pytest.mark.parametrize("classes", [2, 30, 1000])
def test_g_separates_unbalanced_saturated_outputs(classes: int, recipe: str, extreme: bool) -> None:
    """3 member rows per non-member row, members at top probability 1 − 1e-4…1e-2 (robust) or
    1 − 1e-7…1e-4 (saturated), any class count: g separates held-out rows (the official recipe
    learned a constant on the user's model of the README)."""
    p_in, p_out = saturated(600, classes, True, 1, extreme), saturated(200, classes, False, 2, extreme)
    g_recipe = DEFENDER_RECIPES[recipe].g
    g = train_memguard_classifier(p_in, p_out, replace(g_recipe, fit=replace(g_recipe.fit, epochs=30)))
    h_in, h_out = saturated(300, classes, True, 3, extreme), saturated(300, classes, False, 4, extreme)
    with torch.no_grad():
        acc = balanced_accuracy_at(g(torch.sort(h_in.float(), 1).values), g(torch.sort(h_out.float(), 1).values), 0.0)
    assert acc > (0.9 if extreme else 0.75)


def test_robust_substitute_separates_unbalanced_outputs() -> None:
    C = 30
    p_in, p_out = saturated(600, C, True, 5), saturated(200, C, False, 6)
    sub = train_substitute(p_in, p_in.argmax(1), p_out, p_out.argmax(1), DEFENDER_RECIPES["robust"].substitute)
    h_in, h_out = saturated(300, C, True, 7), saturated(300, C, False, 8)

    def logit(p: torch.Tensor) -> torch.Tensor:
        return sub(p.float(), torch.nn.functional.one_hot(p.argmax(1), C).float())

    with torch.no_grad():
        assert balanced_accuracy_at(logit(h_in), logit(h_out), 0.0) > 0.75


@given(st.integers(10, 400), st.integers(10, 400), st.floats(0.05, 0.5), st.integers(0, 100))
@settings(max_examples=30, deadline=None)
def test_holdout_is_a_seeded_partition(n_in: int, n_out: int, fraction: float, seed: int) -> None:
    tr_in, ho_in, tr_out, ho_out = holdout(n_in, n_out, fraction, seed)
    assert sorted(np.r_[tr_in, ho_in]) == list(range(n_in)) and sorted(np.r_[tr_out, ho_out]) == list(range(n_out))
    assert len(ho_in) == round(fraction * n_in) and len(ho_out) == round(fraction * n_out)
    again = holdout(n_in, n_out, fraction, seed)
    assert all(np.array_equal(a, b) for a, b in zip(again, (tr_in, ho_in, tr_out, ho_out), strict=True))


def _quality(acc: float, flagged: float | None) -> DefenseQuality:
    return DefenseQuality(held_out_members=100, held_out_nonmembers=50, classifier_balanced_accuracy=acc,
                          flagged_share=0.5, perturbed_share=0.5, perturbed_share_flagged=flagged, mean_l1=0.1,
                          label_loss=0.0)  # fmt: skip


def test_gate_rules_and_the_override_is_recorded() -> None:
    assert problems("memguard", _quality(0.8, 0.95)) == []
    assert len(problems("memguard", _quality(MIN_BALANCED_ACCURACY - 0.01, 0.95))) == 1
    assert "close to a no-op" in problems("memguard", _quality(0.8, MIN_PERTURBED_FLAGGED - 0.01))[0]
    assert "no row is" in problems("memguard", _quality(0.8, None))[0]
    weak = _quality(0.5, 0.0)
    weak = weak.model_copy(update={"problems": problems("aeppt", weak)})
    with pytest.raises(WeakDefenseError, match="--allow-weak-defense"):
        enforce({"aeppt": weak, "memguard": _quality(0.8, 0.9)}, allow_weak=False)
    kept = enforce({"aeppt": weak, "memguard": _quality(0.8, 0.9)}, allow_weak=True)
    assert kept["aeppt"].override and not kept["aeppt"].passed
    assert not kept["memguard"].override and kept["memguard"].passed
