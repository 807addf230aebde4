"""MemGuard's NN attack [code evaluate_nn_attack.py, train_attack_shadow_model.py].

An MLP C → 512 → 256 → 128 → 1 (ReLU, sigmoid) on the released vector sorted ascending, trained
with BCE on the attacker's shadow outputs (members 1, non-members 0). Official schedule: SGD lr 0.01,
batch 64, 400 epochs, ×0.1 after epoch 300 (on 1,000 rows; a larger attacker set takes as many steps,
``learned.SCHEDULE_ROWS``). It does not use the label.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from defense_models.audit.attacks import register_attack
from defense_models.audit.attacks.base import AttackData
from defense_models.audit.attacks.learned import SCHEDULE_ROWS
from defense_models.training.loop import FitConfig, fit, same_steps
from defense_models.training.nets import mlp

OFFICIAL_FIT = FitConfig(epochs=400, batch_size=64, lr=0.01, optimizer="sgd", lr_milestones=(300,))


@register_attack
class NnSortedAttack:
    name: ClassVar[str] = "nn_sorted"

    def __init__(self, fit_config: FitConfig = OFFICIAL_FIT, seed: int = 0) -> None:
        self.fit_config = replace(fit_config, seed=seed)
        self.model: nn.Module | None = None

    @staticmethod
    def _features(d: AttackData) -> torch.Tensor:
        return torch.from_numpy(np.sort(d.probs, axis=1).astype(np.float32))  # [N, C] ascending

    def fit(self, members: AttackData, nonmembers: AttackData) -> None:
        X = torch.cat([self._features(members), self._features(nonmembers)])
        y = torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))])
        torch.manual_seed(self.fit_config.seed)
        body = mlp(X.shape[1], (512, 256, 128), 1)
        self.model = nn.Sequential(body, nn.Flatten(0))
        fit(self.model, X, y, same_steps(self.fit_config, len(X), SCHEDULE_ROWS), loss_fn=nn.BCEWithLogitsLoss())

    def score(self, data: AttackData) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("fit the attack first")
        self.model.eval()
        with torch.no_grad():
            return torch.sigmoid(self.model(self._features(data))).double().numpy()
