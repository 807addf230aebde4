"""One command from a dataset to a servable bundle.

Dataset and split → target model (or a training-time defense's replacement) → the defender's
classifiers on the served model's outputs → AEPPT calibration → ONNX export with the parity gate,
weights, split indices and ``manifest.json``, written atomically.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defense_models.bundle.defender_step import DefenderConfig, Defenders, TargetOutputs, build_defenders
from defense_models.bundle.defender_step import defender_summary as defender_summary
from defense_models.bundle.export import write_bundle
from defense_models.training.data import Dataset, Split
from defense_models.training.loop import FitConfig, accuracy, fit
from defense_models.training.nets import build, predict_probs
from defense_models.training.recipes import TrainConfig, dataset_and_split, recipe
from defense_models.training.replacements import Pair, replacement_context, role_rows, train_replacement
from gateway.artifacts import AccuracyRecord, DatasetRecord, SplitRecord, TrainingRecord


@dataclass(frozen=True)
class TrainResult:
    summary: dict[str, Any]  # the one-screen summary
    model: torch.nn.Module  # the served model (the replacement, with --replacement advreg)
    split: Split


@dataclass(frozen=True)
class _Served:
    """The served model and how it came to be."""

    model: torch.nn.Module
    arch: str
    fit: FitConfig
    replacement: dict[str, Any]
    accuracy: AccuracyRecord
    seconds: float


def _train_served(config: TrainConfig, data: Dataset, split: Split) -> _Served:
    """The target with its recipe, then (with ``config.replacement``) the model served instead of it."""
    started = time.perf_counter()
    arch, fit_config = recipe(config, data)
    members, nonmembers = role_rows(data, split, "target_train"), role_rows(data, split, "target_test")
    torch.manual_seed(config.seed)
    model = build(arch, data)
    fit(model, *members, fit_config, progress=config.progress, desc=f"target ({arch})")
    plain = AccuracyRecord(train=accuracy(model, *members), test=accuracy(model, *nonmembers))
    if config.replacement == "none":
        return _Served(model, arch, fit_config, {"kind": "none"}, plain, time.perf_counter() - started)
    context = replacement_context(config, data, split, arch, fit_config, members, config.seed)
    model, record = train_replacement(config.replacement, context, dict(config.replacement_params))
    role = "validation" if record.get("trained_on_reference") else "target_test"  # rows the model never saw
    acc = AccuracyRecord(train=accuracy(model, *members), test=accuracy(model, *role_rows(data, split, role)),
                         plain=plain, test_role=role)  # fmt: skip
    return _Served(model, arch, fit_config, record, acc, time.perf_counter() - started)


def train_bundle(config: TrainConfig, out: Path) -> TrainResult:
    """Train, export and write the bundle."""
    data, split = dataset_and_split(config)
    served = _train_served(config, data, split)
    started = time.perf_counter()
    defenders = train_defenders(config, served.model, role_rows(data, split, "target_train"),
                                role_rows(data, split, served.accuracy.test_role))  # fmt: skip
    record = TrainingRecord(
        source="dataset", config=_jsonable(asdict(config)), architecture=served.arch, fit=asdict(served.fit),
        replacement=served.replacement,
        dataset=DatasetRecord(name=data.name, loader=config.dataset, data_path=config.data_path, sha256=data.sha256,
                              rows=len(data.y), width=data.width, binary=data.binary, image_shape=data.image_shape),
        split=SplitRecord(name=split.name, seed=split.seed, sizes=split.sizes()),
        accuracy=served.accuracy, defenders=defenders.report,
        seconds={"model": round(served.seconds, 1), "defenders": round(time.perf_counter() - started, 1)},
    )  # fmt: skip
    files = dict(defenders.files)
    with tempfile.TemporaryDirectory() as tmp:
        split.save(Path(tmp) / "split.npz")
        files["split.npz"] = (Path(tmp) / "split.npz").read_bytes()
    parity = np.concatenate([data.X[split.parts["target_train"][:256]], data.X[split.parts["target_test"][:256]]])
    manifest = write_bundle(out, name=f"{data.name}-demo" if config.preset == "demo" else data.name,
                            model=served.model, width=data.width, classes=data.classes, parity_inputs=parity,
                            extra_files=files, defenses=defenders.entries, self_audit=defenders.self_audit,
                            training=record)  # fmt: skip
    return TrainResult(_summary(manifest, served), served.model, split)


def _summary(manifest: Any, served: _Served) -> dict[str, str]:
    acc = served.accuracy
    assert acc.train is not None and acc.test is not None
    kind = served.replacement["kind"]
    own = served.replacement.get("arch")  # a replacement with its own network (HAMP): the recipe's is not served
    what = served.arch + (f", replacement {kind}" if kind != "none" else "") + (f" on {own}" if own else "")
    summary = {
        "model": f"{manifest.name} {manifest.version} ({what})",
        "train accuracy": f"{acc.train:.4f}",
        "test accuracy": f"{acc.test:.4f}" + (f" (on {acc.test_role})" if acc.test_role != "target_test" else ""),
        "label-only floor": f"{0.5 + (acc.train - acc.test) / 2:.4f}  (0.5 + (train - test)/2)",
        "defenses": ", ".join(manifest.defenses),
        **defender_summary(manifest),
    }
    if acc.plain is not None:
        summary["plain target"] = f"train {acc.plain.train:.4f}, test {acc.plain.test:.4f}"
    return summary


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


def train_defenders(config: TrainConfig, target: torch.nn.Module, members: Pair, nonmembers: Pair) -> Defenders:
    """Train, gate and self-audit the requested defender's classifiers on the target's outputs."""
    p_in = predict_probs(target, members[0])  # [N, C]
    p_out = predict_probs(target, nonmembers[0])

    def predict(X: np.ndarray) -> np.ndarray:  # for defenses that run the model (hamp's self-audit)
        return predict_probs(target, torch.from_numpy(X)).numpy()

    model, inputs = (predict, members[0].shape[1]), torch.cat([members[0], nonmembers[0]]).numpy()
    outputs = TargetOutputs(p_in, members[1], p_out, nonmembers[1], model=model, inputs=inputs)
    return build_defenders(defender_config(config), outputs)
