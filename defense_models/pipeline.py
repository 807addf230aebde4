"""One command from a dataset to a servable bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from defense_models.data import load_dataset, memguard_split
from defense_models.export import write_bundle
from defense_models.nets import mlp
from defense_models.training.loop import FitConfig, accuracy, fit

#: Target recipes. ``official`` is MemGuard's Location30 recipe
#: (``train_user_classification_model.py``: SGD lr 0.01, batch 64, 200 epochs, ×0.1 after 150).
PRESETS: dict[str, tuple[tuple[int, ...], FitConfig]] = {
    "demo": ((256, 128), FitConfig(epochs=30, batch_size=64, lr=1e-3, optimizer="adam")),
    "official": (
        (1024, 512, 256, 128),
        FitConfig(epochs=200, batch_size=64, lr=0.01, optimizer="sgd", lr_milestones=(150,)),
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "location30"
    preset: Literal["demo", "official"] = "official"
    seed: int = 0
    progress: bool = True


def train_bundle(config: TrainConfig, out: Path) -> dict[str, Any]:
    if config.dataset != "location30":
        raise ValueError("only --dataset location30 has a published split so far")
    data = load_dataset(config.dataset)
    split = memguard_split(len(data.y))
    hidden, fit_config = PRESETS[config.preset]
    fit_config = FitConfig(**{**asdict(fit_config), "seed": config.seed})
    torch.manual_seed(config.seed)
    model = mlp(data.width, hidden, data.classes)

    def tensors(role: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = split.parts[role]
        return torch.from_numpy(data.X[idx]), torch.from_numpy(data.y[idx])

    X_tr, y_tr = tensors("target_train")
    X_te, y_te = tensors("target_test")
    fit(
        model,
        X_tr,
        y_tr,
        fit_config,
        val=(X_te, y_te),
        progress=config.progress,
        desc=f"target ({config.preset})",
    )
    train_acc, test_acc = accuracy(model, X_tr, y_tr), accuracy(model, X_te, y_te)
    parity = np.concatenate([data.X[split.parts["target_train"][:256]], data.X[split.parts["target_test"][:256]]])
    name = f"{config.dataset}-{config.preset}" if config.preset == "demo" else config.dataset
    manifest = write_bundle(
        out,
        name=name,
        model=model,
        width=data.width,
        classes=data.classes,
        parity_inputs=parity,
        training={
            "config": asdict(config),
            "architecture": {"kind": "mlp", "hidden": list(hidden), "activation": "relu"},
            "fit": asdict(fit_config),
            "dataset": {"name": data.name, "sha256": data.sha256, "rows": len(data.y)},
            "split": {"name": split.name, "seed": split.seed, "sizes": split.sizes()},
            "accuracy": {"train": train_acc, "test": test_acc},
        },
    )
    return {
        "model": f"{manifest.name} {manifest.version}",
        "train accuracy": f"{train_acc:.4f}",
        "test accuracy": f"{test_acc:.4f}",
        "label-only floor": f"{0.5 + (train_acc - test_acc) / 2:.4f}  (0.5 + (train - test)/2)",
        "defenses": ", ".join(manifest.defenses),
    }
