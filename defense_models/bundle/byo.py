"""Bundles for a user's own ONNX target: the defender's classifiers need only its outputs.

The model is run with ONNX Runtime on the user's member rows (its training data) and non-member
rows (data it never saw), its outputs become the training data of MemGuard's g and AEPPT's
substitute, and the ONNX file is copied into the bundle unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from defense_models.bundle.defender_step import DefenderConfig, TargetOutputs, build_defenders, defender_summary
from defense_models.bundle.export import write_atomically
from gateway.artifacts import AccuracyRecord, Manifest, OutputSpec, TensorSpec, TrainingRecord


def _rows(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """X [N, D] (and labels if present) from an .npz (X/features [, y/labels]) or a .npy."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32), None
    with np.load(path) as d:
        X = next((d[k] for k in ("X", "features", "x") if k in d.files), None)
        y = next((d[k] for k in ("y", "Y", "labels") if k in d.files), None)
        if X is None:
            raise ValueError(f"{path}: expected an array X (or features), found {d.files}")
        return X.astype(np.float32).reshape(len(X), -1), None if y is None else y.astype(np.int64)


def run_onnx(model: Path, *row_sets: np.ndarray) -> tuple[list[np.ndarray], str, str]:
    """The user's model on each set of rows [N, D], one session for all -> (outputs [N, C] each, input and
    output names)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ValueError(f"{model.name} has {len(inputs)} inputs; the gateway serves single-input models")
    batch = inputs[0].shape[0]
    if isinstance(batch, int) and batch != -1:
        raise ValueError(f"{model.name} has a fixed batch size {batch}; export it with a dynamic batch axis")
    outs = [np.concatenate([session.run([outputs[0].name], {inputs[0].name: X[i : i + 1024]})[0]
                            for i in range(0, len(X), 1024)]).astype(np.float32) for X in row_sets]  # fmt: skip
    return outs, inputs[0].name, outputs[0].name


def _probabilities(z: np.ndarray, output_kind: str) -> torch.Tensor:
    """The model's outputs [N, C] -> clean probabilities [N, C] float64."""
    if output_kind == "probabilities":
        if (z < 0).any() or np.abs(z.sum(1) - 1).max() > 1e-3:
            raise ValueError("--output-kind probabilities, but the rows are not distributions; use logits")
        p = torch.from_numpy(z).double()
        return p / p.sum(1, keepdim=True)
    return torch.softmax(torch.from_numpy(z).double(), 1)


def export_user_model(
    model: Path,
    members: Path,
    nonmembers: Path,
    out: Path,
    *,
    name: str,
    output_kind: Literal["logits", "probabilities"],
    config: DefenderConfig,
) -> dict[str, Any]:
    """Run the user's model on their rows, train and gate the defenses, write the bundle; -> summary."""
    X_in, y_in = _rows(members)
    X_out, y_out = _rows(nonmembers)
    if X_in.shape[1] != X_out.shape[1]:
        raise ValueError(f"member rows have {X_in.shape[1]} features, non-member rows {X_out.shape[1]}")
    (z_in, z_out), input_name, output_name = run_onnx(model, X_in, X_out)
    if z_in.ndim != 2 or not np.isfinite(z_in).all() or not np.isfinite(z_out).all():
        raise ValueError(f"{model.name} must return finite [B, C] outputs")
    p_in, p_out = _probabilities(z_in, output_kind), _probabilities(z_out, output_kind)
    labelled = y_in is not None and y_out is not None
    l_in = torch.from_numpy(y_in) if labelled else p_in.argmax(1)
    l_out = torch.from_numpy(y_out) if labelled else p_out.argmax(1)

    def predict(X: np.ndarray) -> np.ndarray:  # for defenses that run the model (hamp's self-audit)
        return _probabilities(run_onnx(model, X)[0][0], output_kind).numpy()

    outputs = TargetOutputs(p_in, l_in, p_out, l_out, true_labels=labelled, model=(predict, X_in.shape[1]),
                            inputs=np.concatenate([X_in, X_out]))  # fmt: skip
    defenders = build_defenders(config, outputs)
    accuracy = AccuracyRecord()
    if labelled:
        accuracy = AccuracyRecord(train=float((z_in.argmax(1) == y_in).mean()),
                                  test=float((z_out.argmax(1) == y_out).mean()))  # fmt: skip

    def manifest(hashes: dict[str, str], version: str) -> Manifest:
        return Manifest(
            name=name, version=version, created=datetime.now(UTC).isoformat(timespec="seconds"),
            input=TensorSpec(name=input_name, width=X_in.shape[1]),
            output=OutputSpec(name=output_name, kind=output_kind, classes=z_in.shape[1]),
            files=hashes, defenses=defenders.entries, self_audit=defenders.self_audit,
            training=TrainingRecord(
                source="user-onnx", accuracy=accuracy, defenders=defenders.report,
                config={"defenses": list(config.chosen()), "recipe": config.recipe, "seed": config.seed},
                rows={"members": len(X_in), "nonmembers": len(X_out)},
            ),
        )  # fmt: skip

    files = {"model.onnx": Path(model).read_bytes(), **defenders.files}
    written = write_atomically(Path(out), files, manifest)
    summary = {"model": f"{name} {written.version}", "classes": str(z_in.shape[1]), "output kind": output_kind}
    if accuracy.train is not None and accuracy.test is not None:
        gap = accuracy.train - accuracy.test
        summary["accuracy"] = f"members {accuracy.train:.4f}, non-members {accuracy.test:.4f}"
        summary["label-only floor"] = f"{0.5 + gap / 2:.4f}  (0.5 + (members - non-members)/2)"
    return summary | defender_summary(written)
