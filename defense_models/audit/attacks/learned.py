"""Learned attacks on the released vector: Shokri et al.'s class-specific models and Nasr et al.'s
inference model (prediction and label branches)."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from defense_models.audit.attacks import register_attack
from defense_models.audit.attacks.base import AttackData
from defense_models.training.adv_reg import InferenceModel
from defense_models.training.loop import FitConfig, fit, same_steps
from defense_models.training.nets import mlp

#: Attack-model training [choice: the papers' settings are not fully legible]: Adam 1e-3, batch 64.
ATTACK_FIT = FitConfig(epochs=100, batch_size=64, lr=1e-3)
#: The learned attacks' schedules are in epochs of an attacker set this large (Location30's 500 + 500 shadow
#: records); a larger set (Fashion-MNIST's 5,000 + 5,000) trains the same number of optimizer steps
#: (``same_steps``) [choice: 100 epochs of 10,000 rows cost minutes per attack and view, measured].
SCHEDULE_ROWS = 1_000


def _binary(members: AttackData, nonmembers: AttackData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probs = np.concatenate([members.probs, nonmembers.probs]).astype(np.float32)
    labels = np.concatenate([members.labels, nonmembers.labels])
    target = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))]).astype(np.float32)
    return probs, labels, target


@register_attack
class ShokriAttack:
    """Shokri et al. (S&P 2017): one binary model per class on the full, unsorted vector (the true
    class shapes the output distribution); at test time the record's class picks the model. Classes
    with fewer than ``min_class_rows`` shadow rows on either side share one model trained on all rows
    [choice: Location's shadow non-members include a class with 3 rows]. Attack model: a 64-unit MLP."""

    name: ClassVar[str] = "shokri"

    def __init__(self, fit_config: FitConfig = ATTACK_FIT, min_class_rows: int = 20, seed: int = 0) -> None:
        self.fit_config = replace(fit_config, seed=seed)
        self.min_class_rows = min_class_rows
        self.models: dict[int, nn.Module] = {}
        self.shared: nn.Module | None = None

    def _train(self, X: np.ndarray, y: np.ndarray) -> nn.Module:
        torch.manual_seed(self.fit_config.seed)
        model = nn.Sequential(mlp(X.shape[1], (64,), 1), nn.Flatten(0))
        config = same_steps(self.fit_config, len(X), SCHEDULE_ROWS)
        fit(model, torch.from_numpy(X), torch.from_numpy(y), config, loss_fn=nn.BCEWithLogitsLoss())
        return model

    def fit(self, members: AttackData, nonmembers: AttackData) -> None:
        X, labels, y = _binary(members, nonmembers)
        self.shared = self._train(X, y)
        self.models = {}
        for c in np.unique(labels):
            rows = labels == c
            if min((y[rows] == 1).sum(), (y[rows] == 0).sum()) >= self.min_class_rows:
                self.models[int(c)] = self._train(X[rows], y[rows])

    def score(self, data: AttackData) -> np.ndarray:
        if self.shared is None:
            raise RuntimeError("fit the attack first")
        X = torch.from_numpy(data.probs.astype(np.float32))
        out = np.empty(len(data))
        with torch.no_grad():
            for c in np.unique(data.labels):
                rows = data.labels == c
                model = self.models.get(int(c), self.shared).eval()
                out[rows] = torch.sigmoid(model(X[torch.from_numpy(rows)])).double().numpy()
        return out


@register_attack
class ShokriOneModelAttack(ShokriAttack):
    """Shokri et al.'s attack with one binary model for all classes (the paper's simpler variant)."""

    name: ClassVar[str] = "shokri_one"

    def __init__(self, fit_config: FitConfig = ATTACK_FIT, seed: int = 0) -> None:
        super().__init__(fit_config, min_class_rows=np.iinfo(np.int64).max, seed=seed)


@register_attack
class InferenceModelAttack:
    """Nasr et al.'s inference model h(prediction, one-hot true label) with prediction, label and
    connection branches (the official code's sizes), trained with BCE on the attacker's data. The
    AEPPT paper's MIM0 is this attack with slightly different layer sizes."""

    name: ClassVar[str] = "inference_model"

    def __init__(self, fit_config: FitConfig = ATTACK_FIT, seed: int = 0) -> None:
        self.fit_config = replace(fit_config, seed=seed)
        self.model: InferenceModel | None = None

    @staticmethod
    def _inputs(probs: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.from_numpy(probs.astype(np.float32))
        return p, nn.functional.one_hot(torch.from_numpy(labels), p.shape[1]).float()

    def fit(self, members: AttackData, nonmembers: AttackData) -> None:
        X, labels, y = _binary(members, nonmembers)
        torch.manual_seed(self.fit_config.seed)
        self.model = InferenceModel(X.shape[1], init_std=None)
        config = same_steps(self.fit_config, len(X), SCHEDULE_ROWS)
        fit(self.model, self._inputs(X, labels), torch.from_numpy(y), config, loss_fn=nn.BCEWithLogitsLoss())

    def score(self, data: AttackData) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("fit the attack first")
        self.model.eval()
        with torch.no_grad():
            return torch.sigmoid(self.model(*self._inputs(data.probs, data.labels))).double().numpy()
