"""One command from a dataset to a servable bundle.

Dataset and split → target model (or a training-time defense's replacement) → the defender's
classifiers on the served model's outputs → AEPPT calibration → ONNX export with the parity gate,
weights, split indices and ``manifest.json``, written atomically.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from defense_models.data import Dataset, Split, load_dataset, make_split
from defense_models.defender_step import (
    DEFENSES,
    DefenderConfig,
    Defenders,
    TargetOutputs,
    build_defenders,
    defender_summary,
)
from defense_models.export import write_bundle
from defense_models.nets import build, predict_logits
from defense_models.training.adv_reg import AdvRegConfig
from defense_models.training.loop import FitConfig, accuracy, fit
from defense_models.training.replacements import Context, train_replacement

#: Target recipes per dataset family: (architecture, fit). ``official`` for Location30 is MemGuard's
#: recipe (train_user_classification_model.py: SGD lr 0.01, batch 64, 200 epochs, ×0.1 after 150).
RECIPES: dict[tuple[str, str], tuple[str, FitConfig]] = {
    ("location30", "official"): (
        "location-mlp",
        FitConfig(epochs=200, batch_size=64, lr=0.01, optimizer="sgd", lr_milestones=(150,)),
    ),
    ("location30", "demo"): ("small-mlp", FitConfig(epochs=30, batch_size=64, lr=1e-3)),
    # Nasr et al.: Adam 1e-3, batch 128
    ("purchase100", "official"): ("purchase-mlp", FitConfig(epochs=30, batch_size=128, lr=1e-3)),
    ("texas100", "official"): ("purchase-mlp", FitConfig(epochs=30, batch_size=128, lr=1e-3)),
    ("image", "official"): ("cnn", FitConfig(epochs=30, batch_size=128, lr=1e-3)),
    ("tabular", "official"): ("small-mlp", FitConfig(epochs=50, batch_size=64, lr=1e-3)),
}


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "location30"
    data_path: str | None = None
    #: memguard (Location30's published split) or random (seeded); default: memguard where it exists.
    split: str | None = None
    #: A split saved as .npz (role -> row indices) instead of a named one: e.g. the records a user's
    #: model was audited on, so ``shadows`` trains LiRA's references over the same pool.
    split_file: str | None = None
    preset: Literal["demo", "official"] = "official"
    arch: str | None = None  # override the recipe's architecture
    epochs: int | None = None  # override the recipe's epochs
    defenses: tuple[str, ...] = DEFENSES
    #: A training-time defense whose model is served instead of the target (``training.replacements``:
    #: advreg, l2, dropout, stacking, dpsgd), with its parameters.
    replacement: str = "none"
    replacement_params: dict[str, Any] = field(default_factory=dict)
    advreg: AdvRegConfig = field(default_factory=AdvRegConfig)
    #: Train the replacement with the target recipe's optimizer, lr and batch size (λ, k, epochs and
    #: warm-up from ``advreg``).
    advreg_follow_recipe: bool = True
    #: Which label AEPPT's substitute learns with: the record's true label, or the target's argmax,
    #: which is what it is fed at serving time (t̂) [choice: argmax, so training matches serving].
    substitute_label: Literal["true", "argmax"] = "argmax"
    #: How the defender's classifiers are trained (``DEFENDER_RECIPES``); None: quick for the demo
    #: preset, robust otherwise.
    defender_recipe: str | None = None
    holdout: float = 0.25  # defender's rows kept for the quality gate and the self-audit
    allow_weak_defense: bool = False  # write a bundle whose defenses fail the quality gate
    seed: int = 0
    progress: bool = True


def _family(data: Dataset) -> str:
    if data.name in ("location30", "purchase100", "texas100"):
        return data.name
    return "image" if data.image_shape is not None else "tabular"


def dataset_and_split(config: TrainConfig) -> tuple[Dataset, Split]:
    data = load_dataset(config.dataset, Path(config.data_path) if config.data_path else None)
    if config.split_file:
        return data, Split.load(Path(config.split_file))
    return data, make_split(data, config.split, config.seed)


def recipe(config: TrainConfig, data: Dataset) -> tuple[str, FitConfig]:
    family = _family(data)
    arch, fit_config = RECIPES.get((family, config.preset)) or RECIPES[(family, "official")]
    fit_config = replace(fit_config, seed=config.seed, epochs=config.epochs or fit_config.epochs)
    return config.arch or arch, fit_config


@dataclass(frozen=True)
class TrainResult:
    summary: dict[str, Any]  # the one-screen summary
    model: torch.nn.Module  # the served model (the replacement, with --replacement advreg)
    split: Split


def train_bundle(config: TrainConfig, out: Path) -> TrainResult:
    """Train, export and write the bundle."""
    started = time.perf_counter()
    data, split = dataset_and_split(config)
    arch, fit_config = recipe(config, data)

    def tensors(role: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = split.parts[role]
        return torch.from_numpy(data.X[idx]), torch.from_numpy(data.y[idx])

    members, nonmembers = tensors("target_train"), tensors("target_test")
    torch.manual_seed(config.seed)
    model = build(arch, data)
    fit(model, *members, fit_config, progress=config.progress, desc=f"target ({arch})")
    accuracies: dict[str, Any] = {"train": accuracy(model, *members), "test": accuracy(model, *nonmembers)}
    t_target = time.perf_counter() - started
    replacement: dict[str, Any] = {"kind": "none"}
    if config.replacement != "none":
        plain = dict(accuracies)
        context = Context(data, arch, fit_config, members, nonmembers, tensors("validation"), config.seed,
                          config.progress, config.advreg, config.advreg_follow_recipe)  # fmt: skip
        model, replacement = train_replacement(config.replacement, context, dict(config.replacement_params))
        accuracies = {"train": accuracy(model, *members), "test": accuracy(model, *nonmembers), "plain": plain}
    t_model = time.perf_counter() - started
    defenders = train_defenders(config, model, members, nonmembers)
    t_defenders = time.perf_counter() - started - t_model
    files = dict(defenders.files)
    with tempfile.TemporaryDirectory() as tmp:
        split.save(Path(tmp) / "split.npz")
        files["split.npz"] = (Path(tmp) / "split.npz").read_bytes()
    parity = np.concatenate([data.X[split.parts["target_train"][:256]], data.X[split.parts["target_test"][:256]]])
    name = f"{data.name}-demo" if config.preset == "demo" else data.name
    manifest = write_bundle(
        out,
        name=name,
        model=model,
        width=data.width,
        classes=data.classes,
        parity_inputs=parity,
        extra_files=files,
        defenses=defenders.entries,
        self_audit=defenders.self_audit,
        training={
            "config": _jsonable(asdict(config)),
            "architecture": arch,
            "fit": asdict(fit_config),
            "replacement": replacement,
            "dataset": {"name": data.name, "sha256": data.sha256, "rows": len(data.y), "width": data.width,
                        "binary": data.binary, "image_shape": data.image_shape},
            "split": _split_record(split),
            "accuracy": accuracies,
            "defenders": defenders.report,
            "seconds": {"target": round(t_target, 1), "model": round(t_model, 1),
                        "defenders": round(t_defenders, 1)},
        },
    )  # fmt: skip
    gap = accuracies["train"] - accuracies["test"]
    kind = f", replacement {replacement['kind']}" if replacement["kind"] != "none" else ""
    summary = {
        "model": f"{manifest.name} {manifest.version} ({arch}{kind})",
        "train accuracy": f"{accuracies['train']:.4f}",
        "test accuracy": f"{accuracies['test']:.4f}",
        "label-only floor": f"{0.5 + gap / 2:.4f}  (0.5 + (train - test)/2)",
        "defenses": ", ".join(manifest.defenses),
        **defender_summary(manifest),
    }
    if "plain" in accuracies:
        p = accuracies["plain"]
        summary["plain target"] = f"train {p['train']:.4f}, test {p['test']:.4f}"
    return TrainResult(summary, model, split)


def _split_record(split: Split) -> dict[str, Any]:
    return {"name": split.name, "seed": split.seed, "sizes": split.sizes(), "file": "split.npz"}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_jsonable(v) for v in obj]
    return obj


def defender_config(config: TrainConfig) -> DefenderConfig:
    recipe = config.defender_recipe or ("quick" if config.preset == "demo" else "robust")
    return DefenderConfig(defenses=config.defenses, recipe=recipe, holdout=config.holdout,
                          allow_weak_defense=config.allow_weak_defense, substitute_label=config.substitute_label,
                          seed=config.seed, progress=config.progress)  # fmt: skip


def train_defenders(
    config: TrainConfig,
    target: torch.nn.Module,
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
) -> Defenders:
    """Train, gate and self-audit the requested defender's classifiers on the target's outputs."""
    p_in = torch.softmax(predict_logits(target, members[0]).double(), dim=1)  # [N, C]
    p_out = torch.softmax(predict_logits(target, nonmembers[0]).double(), dim=1)
    return build_defenders(defender_config(config), TargetOutputs(p_in, members[1], p_out, nonmembers[1]))
