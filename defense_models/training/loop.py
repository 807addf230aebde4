"""The one fit loop: seeded, device-aware, progress bar, optional early stopping."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: Multiply the learning rate by 0.1 at these epochs (MemGuard's recipe: [150]).
    lr_milestones: tuple[int, ...] = ()
    #: Stop when validation accuracy has not improved for this many epochs (0 = never); the
    #: best-validation weights are restored.
    patience: int = 0
    seed: int = 0
    #: Train a model with convolutions in the channels-last layout (oneDNN's fast path on CPU; returned in the
    #: default layout). bench/fit_speed.py: 1.5x a Fashion-MNIST CNN epoch on the 2-core VM.
    channels_last: bool = True


def same_steps(config: FitConfig, rows: int, reference_rows: int) -> FitConfig:
    """``config`` for ``rows`` training rows with the optimizer steps it takes on ``reference_rows``: a larger
    set trains for proportionally fewer epochs (milestones alike, at least one epoch); a smaller or equal one
    keeps ``config``."""
    if rows <= reference_rows:
        return config
    scale = reference_rows / rows
    return replace(config, epochs=max(1, round(config.epochs * scale)),
                   lr_milestones=tuple(max(1, round(m * scale)) for m in config.lr_milestones))  # fmt: skip


@dataclass
class FitResult:
    epochs_run: int
    train_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)


Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def _as_tuple(X: Inputs) -> tuple[torch.Tensor, ...]:
    return X if isinstance(X, tuple) else (X,)


def accuracy(model: nn.Module, X: Inputs, y: torch.Tensor) -> float:
    """Top-1 accuracy for a classifier, or thresholded accuracy (logit > 0) for a binary model."""
    model.eval()
    with torch.no_grad():
        out = model(*_as_tuple(X))
        pred = out.argmax(dim=1) if out.dim() == 2 else (out > 0).to(y.dtype)
        return float((pred == y).float().mean())


def optimizer(model: nn.Module, kind: str, lr: float, *, momentum: float = 0.0, weight_decay: float = 0.0,
              milestones: tuple[int, ...] = ()) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """``kind`` sgd or adam over the model's parameters, with a ×0.1 step at each milestone epoch."""
    opt: torch.optim.Optimizer
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), 0.1)


def epoch_bar(epochs: int, progress: bool, desc: str) -> tuple[Iterable[int], Any]:
    """range(epochs), wrapped in a tqdm bar (returned too, for its postfix) when ``progress``."""
    if not progress:
        return range(epochs), None
    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), desc=desc, leave=False)
    return bar, bar


def fit(
    model: nn.Module,
    X: Inputs,
    y: torch.Tensor,
    config: FitConfig,
    *,
    loss_fn: nn.Module | None = None,
    val: tuple[Inputs, torch.Tensor] | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "fit",
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> FitResult:
    """Minibatch training of ``model`` on (X[N, ...] or a tuple of such, y[N]) in place.

    ``on_epoch(epoch, model)`` runs after every epoch (learning curves, e.g. ``bench/advreg_frontier.py``).
    """
    device = device or torch.device("cpu")
    gen = seed_everything(config.seed)
    model.to(device)
    nhwc = config.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if nhwc:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (runtime API; stubs lack it)
    xs = tuple(x.to(device) for x in _as_tuple(X))
    y = y.to(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt, sched = optimizer(model, config.optimizer, config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, milestones=config.lr_milestones)  # fmt: skip
    result = FitResult(epochs_run=0)
    best = (-1.0, copy.deepcopy(model.state_dict()))
    stale = 0
    epochs, bar = epoch_bar(config.epochs, progress, desc)
    n = y.shape[0]
    for _ in epochs:
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        for i in range(0, n, config.batch_size):
            b = perm[i : i + config.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(*(x[b] for x in xs)), y[b])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * b.numel()
        sched.step()
        if on_epoch is not None:
            on_epoch(result.epochs_run, model)
        result.epochs_run += 1
        result.train_loss.append(total / n)
        if val is not None:
            acc = accuracy(model, tuple(v.to(device) for v in _as_tuple(val[0])), val[1].to(device))
            result.val_acc.append(acc)
            if bar is not None:
                bar.set_postfix(loss=f"{total / n:.3f}", val_acc=f"{acc:.3f}")
            if config.patience:
                if acc > best[0]:
                    best, stale = (acc, copy.deepcopy(model.state_dict())), 0
                else:
                    stale += 1
                    if stale >= config.patience:
                        break
    if val is not None and config.patience and best[0] >= 0:
        model.load_state_dict(best[1])
    if nhwc:
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    model.eval()
    return result
