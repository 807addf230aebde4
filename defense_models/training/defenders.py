"""The defender's classifiers: MemGuard's g and AEPPT's substitute, trained on target outputs.

Both learn members (the target's training rows, label 1) against non-members the defender holds
(label 0) from the target's confidence vectors only, so they work for any target, including a
user-supplied ONNX model.
"""

from __future__ import annotations

import torch
from torch import nn

from defense_models.training.loop import FitConfig, accuracy, fit
from gateway.defenses.classifier import AepptSubstitute, MemGuardClassifier

#: MemGuard's recipe [code train_defense_model_defensemodel.py]: BCE, SGD lr 0.001, batch 64, 400 epochs.
MEMGUARD_FIT = FitConfig(epochs=400, batch_size=64, lr=0.001, optimizer="sgd")
#: AEPPT [paper §5.2]: lr 0.001, 100 epochs; optimizer and batch size unstated [choice: Adam, 128].
SUBSTITUTE_FIT = FitConfig(epochs=100, batch_size=128, lr=0.001, optimizer="adam")


def _binary(members: torch.Tensor, nonmembers: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))])


def train_memguard_classifier(
    member_probs: torch.Tensor,
    nonmember_probs: torch.Tensor,
    config: FitConfig = MEMGUARD_FIT,
    *,
    progress: bool = False,
) -> tuple[MemGuardClassifier, float]:
    """probs [N, C] of members and non-members -> (g trained on sorted vectors, training accuracy)."""
    X = torch.sort(torch.cat([member_probs, nonmember_probs]).float(), dim=1).values  # [N, C] ascending
    y = _binary(member_probs, nonmember_probs)
    torch.manual_seed(config.seed)
    g = MemGuardClassifier(X.shape[1])
    fit(g, X, y, config, loss_fn=nn.BCEWithLogitsLoss(), progress=progress, desc="memguard g")
    return g, accuracy(g, X, y)


def train_substitute(
    member_probs: torch.Tensor,
    member_labels: torch.Tensor,
    nonmember_probs: torch.Tensor,
    nonmember_labels: torch.Tensor,
    config: FitConfig = SUBSTITUTE_FIT,
    *,
    progress: bool = False,
) -> tuple[AepptSubstitute, float]:
    """The substitute F(v, t), with t the one-hot label given (true or argmax, the caller's choice)."""
    C = member_probs.shape[1]
    v = torch.cat([member_probs, nonmember_probs]).float()
    t = nn.functional.one_hot(torch.cat([member_labels, nonmember_labels]), C).float()
    y = _binary(member_probs, nonmember_probs)
    torch.manual_seed(config.seed)
    sub = AepptSubstitute(C)
    fit(sub, (v, t), y, config, loss_fn=nn.BCEWithLogitsLoss(), progress=progress, desc="aeppt substitute")
    return sub, accuracy(sub, (v, t), y)
