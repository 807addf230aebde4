"""The noise-robustness attack beats chance on an overfit model, and a label-preserving defense
(here rounding to one decimal) does not change its score at all."""

from __future__ import annotations

import numpy as np
import torch

from defense_models.attacks.label_only import NoiseRobustnessAttack
from defense_models.data import load_dataset, memguard_split
from defense_models.scoring import score_attack
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
    attack.fit(predictor(shadow), d.X[take["shadow_in"]], d.y[take["shadow_in"]],
               d.X[take["shadow_out"]], d.y[take["shadow_out"]])  # fmt: skip
    assert attack.flip in attack.flips
    rows = {r: (d.X[take[r]], d.y[take[r]]) for r in ("target_train", "eval_nonmember")}
    raw = [attack.score(predictor(target), *rows[r]) for r in ("target_train", "eval_nonmember")]
    defended = [attack.score(predictor(target, decimals=1), *rows[r]) for r in ("target_train", "eval_nonmember")]
    assert score_attack(*raw).auc > 0.6
    np.testing.assert_array_equal(raw[0], defended[0])  # labels are all it sees: the defense is invisible
    np.testing.assert_array_equal(raw[1], defended[1])
    assert attack.queries > 0
