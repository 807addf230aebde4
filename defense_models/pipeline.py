"""One command from a dataset to a servable bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from defense_models.calibrate import calibrate_aeppt_step
from defense_models.data import load_dataset, memguard_split
from defense_models.export import write_bundle
from defense_models.nets import mlp, predict_logits
from defense_models.training.defenders import MEMGUARD_FIT, SUBSTITUTE_FIT, train_memguard_classifier, train_substitute
from defense_models.training.loop import FitConfig, accuracy, fit
from gateway.artifacts import DefenseEntry
from gateway.defenses.aeppt import AepptParams
from gateway.defenses.classifier import save_weights

#: Target recipes. ``official`` is MemGuard's Location30 recipe
#: (``train_user_classification_model.py``: SGD lr 0.01, batch 64, 200 epochs, ×0.1 after 150).
PRESETS: dict[str, tuple[tuple[int, ...], FitConfig]] = {
    "demo": ((256, 128), FitConfig(epochs=30, batch_size=64, lr=1e-3, optimizer="adam")),
    "official": (
        (1024, 512, 256, 128),
        FitConfig(epochs=200, batch_size=64, lr=0.01, optimizer="sgd", lr_milestones=(150,)),
    ),
}


#: The defender's classifiers per preset: the published recipes, or quick ones for the demo.
DEFENDER_FITS: dict[str, tuple[FitConfig, FitConfig]] = {
    "demo": (FitConfig(epochs=100, batch_size=64, lr=1e-3, optimizer="adam"), SUBSTITUTE_FIT),
    "official": (MEMGUARD_FIT, SUBSTITUTE_FIT),
}
DEFENSES = ("memguard", "aeppt")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "location30"
    preset: Literal["demo", "official"] = "official"
    defenses: tuple[str, ...] = DEFENSES
    #: Which label the substitute learns with: the record's true label, or the target's argmax,
    #: which is what it is fed at serving time (t̂) [choice: argmax, so training matches serving].
    substitute_label: Literal["true", "argmax"] = "argmax"
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
    extra_files, defenses, report = _train_defenders(config, model, tensors("target_train"), tensors("target_test"))
    parity = np.concatenate([data.X[split.parts["target_train"][:256]], data.X[split.parts["target_test"][:256]]])
    name = f"{config.dataset}-{config.preset}" if config.preset == "demo" else config.dataset
    manifest = write_bundle(
        out,
        name=name,
        model=model,
        width=data.width,
        classes=data.classes,
        parity_inputs=parity,
        extra_files=extra_files,
        defenses=defenses,
        training={
            "defenders": report,
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
        **{k: v for k, v in report.items() if k.endswith(("accuracy", "calibration"))},
    }


def _train_defenders(
    config: TrainConfig,
    target: torch.nn.Module,
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
) -> tuple[dict[str, bytes], dict[str, DefenseEntry], dict[str, Any]]:
    """Train the requested defender's classifiers on the target's outputs; return files, entries, report."""
    import tempfile

    g_fit, sub_fit = DEFENDER_FITS[config.preset]
    p_in = torch.softmax(predict_logits(target, members[0]), dim=1)  # [N, C]
    p_out = torch.softmax(predict_logits(target, nonmembers[0]), dim=1)
    files: dict[str, bytes] = {}
    entries: dict[str, DefenseEntry] = {"none": DefenseEntry()}
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "memguard" in config.defenses:
            g, acc = train_memguard_classifier(p_in, p_out, replace(g_fit, seed=config.seed), progress=config.progress)
            save_weights(g, Path(tmp) / "g")
            files["memguard_g.safetensors"] = (Path(tmp) / "g").read_bytes()
            entries["memguard"] = DefenseEntry(weights="memguard_g.safetensors", params={"epsilon": 1.0})
            report["memguard_g_train_accuracy"] = round(acc, 4)
            report["memguard_fit"] = asdict(g_fit)
        if "aeppt" in config.defenses:
            if config.substitute_label == "true":
                l_in, l_out = members[1], nonmembers[1]
            else:
                l_in, l_out = p_in.argmax(1), p_out.argmax(1)
            sub, acc = train_substitute(
                p_in, l_in, p_out, l_out, replace(sub_fit, seed=config.seed), progress=config.progress
            )
            cal = calibrate_aeppt_step(sub, p_in, p_out)
            save_weights(sub, Path(tmp) / "s")
            files["aeppt_substitute.safetensors"] = (Path(tmp) / "s").read_bytes()
            params = AepptParams(step_size=cal.step_size)
            entries["aeppt"] = DefenseEntry(
                weights="aeppt_substitute.safetensors",
                params={"step_size": params.step_size, "iterations": params.iterations},
            )
            report["aeppt_substitute_train_accuracy"] = round(acc, 4)
            report["aeppt_calibration"] = {
                "step_size": cal.step_size,
                "substitute_balanced_accuracy": round(cal.balanced_accuracy, 4),
                "mean_l1": round(cal.mean_l1, 4),
                "evaluations": cal.evaluations,
            }
            report["aeppt_fit"] = asdict(sub_fit)
            report["aeppt_substitute_label"] = config.substitute_label
    return files, entries, report
