"""Target architectures from the literature, behind one registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from defense_models.training.data import Dataset


def mlp(width: int, hidden: Sequence[int], classes: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """width → hidden… → classes, emitting logits.

    Glorot-uniform weights and zero biases, as in the Keras and TensorFlow originals: with PyTorch's
    smaller default init, MemGuard's plain-SGD recipe (lr 0.01) barely moves a 446-1024-512-256-128-30
    MLP (7% train accuracy after 200 epochs, measured).
    """
    layers: list[nn.Module] = []
    prev = width
    for h in hidden:
        layers += [nn.Linear(prev, h), activation()]
        prev = h
    layers.append(nn.Linear(prev, classes))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def cnn(image_shape: tuple[int, int, int], classes: int, channels: tuple[int, int] = (32, 64), convs: int = 2,
        hidden: int = 512) -> nn.Sequential:
    """A small CNN for images stored flat [N, c·h·w]: two blocks of ``convs`` 3×3 convolutions (``channels``)
    and a 2×2 pool, then FC ``hidden``. The defaults are the CH-MNIST net used with MemGuard (conv32 ×2, pool,
    conv64 ×2, pool, FC 512). The first layer restores the image shape, so the served ONNX model still takes
    flat rows."""
    c, h, w = image_shape
    layers: list[nn.Module] = [nn.Unflatten(1, image_shape)]
    for width in channels:
        for _ in range(convs):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
            c = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * (h // 4) * (w // 4), hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))  # fmt: skip


#: ``cnn`` ~14x cheaper (conv16, pool, conv32, pool, FC 256; ~1.4 M multiply-adds an image against ~20 M), for
#: Fashion-MNIST's recipe: LiRA needs dozens of reference models, and on two CPU cores ``cnn`` costs ~2.5 min
#: each (this one, 30 epochs: ~75 s on one thread beside another job).
SMALL_CNN: dict[str, Any] = {"channels": (16, 32), "convs": 1, "hidden": 256}


#: name -> builder(dataset) -> model emitting logits.
ARCHITECTURES: dict[str, Callable[[Dataset], nn.Module]] = {
    # MemGuard's Location30 target (train_user_classification_model.py)
    "location-mlp": lambda d: mlp(d.width, (1024, 512, 256, 128), d.classes),
    # Nasr et al.'s Purchase100 / Texas100 classifier: 1024-512-256-128, Tanh
    "purchase-mlp": lambda d: mlp(d.width, (1024, 512, 256, 128), d.classes, nn.Tanh),
    "small-mlp": lambda d: mlp(d.width, (256, 128), d.classes),
    "cnn": lambda d: cnn(_image_shape(d), d.classes),
    "small-cnn": lambda d: cnn(_image_shape(d), d.classes, **SMALL_CNN),
}


def _image_shape(d: Dataset) -> tuple[int, int, int]:
    if d.image_shape is None:
        raise ValueError(f"a cnn architecture needs image data; {d.name} is tabular")
    return d.image_shape


def build(name: str, data: Dataset) -> nn.Module:
    try:
        return ARCHITECTURES[name](data)
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """X[N, D] -> logits[N, C] in eval mode."""
    model.eval()
    return torch.cat([model(X[i : i + batch]) for i in range(0, X.shape[0], batch)])


def predict_probs(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """X[N, D] -> softmax probabilities [N, C] in float64, in eval mode."""
    return torch.softmax(predict_logits(model, X).double(), dim=1)
