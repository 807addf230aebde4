"""The noise-robustness attack beats chance on an overfit model, and a label-preserving defense
(here rounding to one decimal) does not change its score at all."""

from __future__ import annotations

import numpy as np
import torch

from defense_models.audit.attacks.label_only import BoundaryDistanceAttack, NoiseRobustnessAttack
from defense_models.audit.scoring import score_attack
from defense_models.training.data import load_dataset, memguard_split
from defense_models.training.loop import FitConfig, fit


def overfit_model(X: np.ndarray, y: np.ndarray, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(446, 128), torch.nn.ReLU(), torch.nn.Linear(128, 30))
    fit(model, torch.from_numpy(X), torch.from_numpy(y), FitConfig(epochs=40, batch_size=64, lr=1e-3, seed=seed))
    return model.eval()


def predictor(model: torch.nn.Module, decimals: int | None = None):  # type: ignore[no-untyped-def]
    def predict(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            p = torch.softmax(model(torch.from_numpy(X)).double(), 1).numpy()
        if decimals is not None:  # a label-preserving post-processor: round, keep the argmax, renormalise
            r = np.round(p, decimals)
            r[np.arange(len(r)), p.argmax(1)] = r.max(1) + 10.0**-decimals
            p = r / r.sum(1, keepdims=True)
        return p

    return predict


def test_noise_robustness_works_through_a_label_preserving_defense() -> None:
    d, parts = load_dataset("location30"), memguard_split().parts
    take = {k: v[:250] for k, v in parts.items()}
    target = overfit_model(d.X[take["target_train"]], d.y[take["target_train"]], 0)
    shadow = overfit_model(d.X[take["shadow_in"]], d.y[take["shadow_in"]], 1)
    attack = NoiseRobustnessAttack(copies=20)
    calib = attack.fit(predictor(shadow), d.X[take["shadow_in"]], d.y[take["shadow_in"]],
                       d.X[take["shadow_out"]], d.y[take["shadow_out"]])  # fmt: skip
    assert attack.flip in attack.flips
    # fit returns the shadow scores at the chosen flip rate, the same a second scoring gives
    np.testing.assert_array_equal(calib[0], attack.score(predictor(shadow), d.X[take["shadow_in"]],
                                                         d.y[take["shadow_in"]]))  # fmt: skip
    rows = {r: (d.X[take[r]], d.y[take[r]]) for r in ("target_train", "eval_nonmember")}
    raw = [attack.score(predictor(target), *rows[r]) for r in ("target_train", "eval_nonmember")]
    defended = [attack.score(predictor(target, decimals=1), *rows[r]) for r in ("target_train", "eval_nonmember")]
    assert score_attack(*raw).auc > 0.6
    np.testing.assert_array_equal(raw[0], defended[0])  # labels are all it sees: the defense is invisible
    np.testing.assert_array_equal(raw[1], defended[1])
    assert attack.queries > 0


def test_boundary_distance_beats_chance_within_its_budget_and_ignores_the_output_defense() -> None:
    d, parts = load_dataset("location30"), memguard_split().parts
    take = {k: v[:150] for k, v in parts.items()}
    target = overfit_model(d.X[take["target_train"]], d.y[take["target_train"]], 0)
    shadow = overfit_model(d.X[take["shadow_in"]], d.y[take["shadow_in"]], 1)
    attack = BoundaryDistanceAttack(max_queries=120, seed=3)
    s_in, s_out = attack.fit(predictor(shadow), d.X[take["shadow_in"]], d.y[take["shadow_in"]],
                             d.X[take["shadow_out"]], d.y[take["shadow_out"]])  # fmt: skip
    assert attack.threshold is not None and s_in.shape == (150,) and (s_in >= 0).all()
    before = attack.queries
    rows = {r: (d.X[take[r]], d.y[take[r]]) for r in ("target_train", "eval_nonmember")}
    raw = [attack.score(predictor(target), *rows[r]) for r in ("target_train", "eval_nonmember")]
    assert attack.queries - before <= 2 * 150 * attack.max_queries  # the per-row budget holds
    defended = [attack.score(predictor(target, decimals=1), *rows[r]) for r in ("target_train", "eval_nonmember")]
    scores = score_attack(*raw, shadow=(s_in, s_out))
    assert scores.auc > 0.6, scores
    np.testing.assert_allclose(raw[0], defended[0])  # same labels, same seed: same distances
    np.testing.assert_allclose(raw[1], defended[1])


def test_boundary_budget_is_exact() -> None:
    calls: list[int] = []

    def predict(X: np.ndarray) -> np.ndarray:  # a linear two-class model
        calls.append(len(X))
        z = X[:, :1] - 0.5
        return np.concatenate([z, -z], axis=1)

    X = np.random.default_rng(0).uniform(0, 1, (7, 5)).astype(np.float32)
    y = predict(X).argmax(1)
    calls.clear()
    attack = BoundaryDistanceAttack(max_queries=400, init_tries=12, search_steps=8, grad_queries=8, step_tries=3)
    dist = attack.distances(predict, X, y)
    assert sum(calls) == attack.queries <= 7 * 400
    true = np.abs(X[:, 0] - 0.5)  # the distance to the boundary x₀ = 0.5
    assert (dist >= true - 1e-6).all()  # every boundary point found really is labelled differently
    np.testing.assert_allclose(dist, true, atol=0.05)
