"""The defender's classifiers, defined once here; the offline job imports them to train.

Both return a *logit* (pre-sigmoid). ``weights()`` hands the defenses plain tensors for their
hand-written batched forward/backward passes; the modules themselves stay ordinary ``nn.Module``s
for training and for the reference implementations in the tests.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from gateway.artifacts import write_atomically


class MemGuardClassifier(nn.Module):
    """MemGuard's defense classifier g [code jinyuan-jia/MemGuard ``model/fccnet_location.py``].

    Input: a probability vector sorted ascending (top-1 last) [N, C]; output: logit h [N].
    C → 256 → 128 → 64 → 1 with ReLU and Glorot-uniform weights, as in the Keras original.

    ``log_floor`` > 0 (a buffer, saved with the weights) makes the first layer read log(s + floor)
    instead of s: the features of the opt-in ``saturated`` defender's recipe, which resolve the tail
    probabilities of extremely saturated targets. 0 (the original) reads s itself.
    """

    HIDDEN = (256, 128, 64)

    log_floor: torch.Tensor

    def __init__(self, classes: int, log_floor: float = 0.0) -> None:
        super().__init__()
        self.classes = classes
        dims = (classes, *self.HIDDEN, 1)
        linear = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
        for layer in linear:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(linear)
        self.register_buffer("log_floor", torch.tensor(float(log_floor)))

    def features(self, probs: torch.Tensor) -> torch.Tensor:
        """What the first layer reads: s, or log(s + floor). [N, C] -> [N, C]"""
        floor = float(self.log_floor)
        return torch.log(probs + floor) if floor > 0 else probs

    def forward(self, sorted_probs: torch.Tensor) -> torch.Tensor:
        x = self.features(sorted_probs)  # [N, C]
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        out: torch.Tensor = self.layers[-1](x)
        return out[:, 0]  # [N]

    def weights(self, device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(W [out, in], b [out]), ...] detached, for the batched Phase I."""
        linear = [lay for lay in self.layers if isinstance(lay, nn.Linear)]
        return [(lay.weight.detach().to(device, dtype), lay.bias.detach().to(device, dtype)) for lay in linear]


class AepptSubstitute(nn.Module):
    """AEPPT's substitute membership model F(v, t) [paper §4.3, §5.2].

    Prediction branch C → 256 and label branch C → 256 (ReLU) feed a connection net
    512 → 64 → 1 (ReLU); output: logit [N]. ``v`` is the prediction vector [N, C] and ``t`` a
    one-hot label [N, C].
    """

    def __init__(self, classes: int, width: int = 256, hidden: int = 64) -> None:
        super().__init__()
        self.classes = classes
        self.pred = nn.Linear(classes, width)
        self.label = nn.Linear(classes, width)
        self.conn = nn.Linear(2 * width, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([torch.relu(self.pred(v)), torch.relu(self.label(t))], dim=1)  # [N, 512]
        out: torch.Tensor = self.out(torch.relu(self.conn(joint)))
        return out[:, 0]  # [N]


def save_weights(module: nn.Module, path: Path) -> None:
    """Written to a temporary file beside ``path`` and renamed over it: a reader (another shard sharing a
    cache) sees the old file or the whole new one, never a partial write."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))


M = TypeVar("M", bound=nn.Module)


def load_weights(module: M, path: Path) -> M:
    """Strict load from safetensors; a shape or name mismatch names the file to rebuild."""
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path.name} does not fit {type(module).__name__}: {exc}; rebuild the bundle") from exc
    return module.eval()
