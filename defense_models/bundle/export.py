"""ONNX export with a parity gate, and atomic bundle writes.

The gate runs the exported graph in ONNX Runtime (CPU) next to torch on the same inputs and
refuses to write the bundle on any mismatch: a bundle that reaches the gateway computes what
was trained.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from gateway.artifacts import (
    DefenseEntry,
    Manifest,
    OutputSpec,
    SelfAuditRow,
    TensorSpec,
    TrainingRecord,
    sha256_file,
    write_manifest,
)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportParityError(RuntimeError):
    pass


def export_onnx(model: nn.Module, width: int) -> bytes:
    """model (x[B, width] -> logits[B, C]) -> ONNX bytes with a dynamic batch axis."""
    model = model.cpu().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export (which needs onnxscript);
        # for these static feed-forward graphs both give the same ONNX, and this one has no extra deps.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(2, width),),
            buf,  # type: ignore[arg-type]  # a file object works; torch's annotation says path
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return buf.getvalue()


def check_parity(
    onnx_bytes: bytes, model: nn.Module, X: np.ndarray, *, atol: float = 1e-4, rtol: float = 1e-4
) -> float:
    """Compare ORT and torch on X[N, D]; returns the max abs difference or raises."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {INPUT_NAME: X[i : i + 1024]})[0] for i in range(0, len(X), 1024)])
    with torch.no_grad():
        want = model.cpu().eval()(torch.from_numpy(X)).numpy()
    if got.shape != want.shape:
        raise ExportParityError(f"ONNX output shape {got.shape} != torch {want.shape}; the export is broken")
    diff = np.abs(got - want)
    worst = float(diff.max()) if diff.size else 0.0
    if not np.all(diff <= atol + rtol * np.abs(want)) or not np.array_equal(got.argmax(1), want.argmax(1)):
        raise ExportParityError(
            f"ONNX Runtime disagrees with torch (max abs diff {worst:.3g} > {atol} + {rtol}·|ref|, or labels differ); "
            "the bundle was not written"
        )
    return worst


def write_bundle(
    out: Path,
    *,
    name: str,
    model: nn.Module,
    width: int,
    classes: int,
    parity_inputs: np.ndarray,
    output_kind: Literal["logits", "probabilities"] = "logits",
    extra_files: dict[str, bytes] | None = None,
    defenses: dict[str, DefenseEntry] | None = None,
    training: TrainingRecord | None = None,
    self_audit: list[SelfAuditRow] | None = None,
) -> Manifest:
    """Export, gate, hash and write a bundle directory atomically (rename into place)."""
    onnx_bytes = export_onnx(model, width)
    parity = check_parity(onnx_bytes, model, np.ascontiguousarray(parity_inputs, dtype=np.float32))
    files = {"model.onnx": onnx_bytes, **(extra_files or {})}

    def manifest(hashes: dict[str, str], version: str) -> Manifest:
        return Manifest(
            name=name,
            version=version,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            input=TensorSpec(name=INPUT_NAME, width=width),
            output=OutputSpec(name=OUTPUT_NAME, kind=output_kind, classes=classes),
            files=hashes,
            defenses=defenses or {"none": DefenseEntry()},
            training=(training or TrainingRecord(source="torch-model")).model_copy(
                update={"onnx_parity_max_abs_diff": parity, "versions": _versions()}
            ),
            self_audit=self_audit or [],
        )

    return write_atomically(Path(out), files, manifest)


def write_atomically(
    out: Path, files: dict[str, bytes], manifest: Callable[[dict[str, str], str], Manifest]
) -> Manifest:
    """Write ``files`` into a temporary sibling of ``out``, hash them, build the manifest from the hashes
    and a content version, and rename the directory into place: readers see the old bundle or the new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        hashes = {rel: sha256_file(tmp / rel) for rel in sorted(files)}
        version = hashlib.sha256("".join(f"{k}={v};" for k, v in hashes.items()).encode()).hexdigest()[:12]
        result = manifest(hashes, version)
        write_manifest(tmp, result)
        backup = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, backup)
        os.replace(tmp, out)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _versions() -> dict[str, str]:
    import onnxruntime

    import gateway

    return {
        "mi-gateway": gateway.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
