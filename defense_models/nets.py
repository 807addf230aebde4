"""Target architectures from the literature."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(width: int, hidden: Sequence[int], classes: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """width → hidden… → classes, emitting logits.

    Location30 (MemGuard): hidden (1024, 512, 256, 128), ReLU. Purchase100 (Nasr et al.):
    (1024, 512, 256, 128), Tanh.
    """
    layers: list[nn.Module] = []
    prev = width
    for h in hidden:
        layers += [nn.Linear(prev, h), activation()]
        prev = h
    layers.append(nn.Linear(prev, classes))
    return nn.Sequential(*layers)


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """X[N, D] -> logits[N, C] in eval mode."""
    model.eval()
    return torch.cat([model(X[i : i + batch]) for i in range(0, X.shape[0], batch)])
