"""The export parity gate: ORT must agree with torch before a bundle is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defense_models.bundle import export
from gateway.artifacts import load_bundle
from tests.conftest import CLASSES, WIDTH, tiny_model


def test_good_export_passes_and_is_servable(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(50, WIDTH)).astype(np.float32)
    m = export.write_bundle(tmp_path / "b", name="t", model=tiny_model(), width=WIDTH, classes=CLASSES, parity_inputs=x)
    assert load_bundle(tmp_path / "b").manifest == m
    assert m.training is not None and (m.training.onnx_parity_max_abs_diff or 0.0) < 1e-5


def test_broken_export_is_refused_and_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda model, width: real(tiny_model(seed=1), width))
    x = np.random.default_rng(0).normal(size=(50, WIDTH)).astype(np.float32)
    with pytest.raises(export.ExportParityError, match="disagrees with torch"):
        export.write_bundle(tmp_path / "b", name="t", model=tiny_model(), width=WIDTH, classes=CLASSES, parity_inputs=x)
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.iterdir())


def test_rewrite_replaces_a_bundle_atomically(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(8, WIDTH)).astype(np.float32)
    first = export.write_bundle(
        tmp_path / "b", name="t", model=tiny_model(0), width=WIDTH, classes=CLASSES, parity_inputs=x
    )
    second = export.write_bundle(
        tmp_path / "b", name="t", model=tiny_model(1), width=WIDTH, classes=CLASSES, parity_inputs=x
    )
    assert first.version != second.version
    assert load_bundle(tmp_path / "b").manifest.version == second.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_dynamic_batch_axis() -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(export.export_onnx(tiny_model(), WIDTH), providers=["CPUExecutionProvider"])
    for b in (1, 7, 300):
        assert session.run(None, {"input": np.zeros((b, WIDTH), np.float32)})[0].shape == (b, CLASSES)
    assert torch.is_tensor(torch.zeros(1))


@pytest.mark.parametrize("small", [False, True])
def test_a_cnn_trained_channels_last_exports_with_parity(tmp_path: Path, small: bool) -> None:
    """``fit`` trains convolutions in the channels-last layout and hands the model back in the default one:
    every parameter contiguous, and the exported ONNX model agrees with torch."""
    from defense_models.training.loop import FitConfig, fit
    from defense_models.training.nets import SMALL_CNN, cnn

    rng = np.random.default_rng(0)
    x = rng.random((64, 64)).astype(np.float32)  # 64 flat 1×8×8 images
    model = cnn((1, 8, 8), CLASSES, **(SMALL_CNN if small else {}))
    fit(model, torch.from_numpy(x), torch.from_numpy(rng.integers(0, CLASSES, 64)), FitConfig(epochs=2, batch_size=16))
    assert all(p.is_contiguous() for p in model.parameters())
    m = export.write_bundle(tmp_path / "b", name="cnn", model=model, width=64, classes=CLASSES, parity_inputs=x)
    assert m.training is not None and (m.training.onnx_parity_max_abs_diff or 0.0) < 1e-5
