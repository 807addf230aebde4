"""Bundles: verified loading, and refusals that name the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.artifacts import load_bundle
from gateway.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_loads_and_verifies(bundle_copy: Path) -> None:
    b = load_bundle(bundle_copy)
    m = b.manifest
    assert (m.name, m.input.width, m.output.classes, m.output.kind) == ("tiny", 8, 4, "logits")
    assert set(m.files) == {"model.onnx"} and len(m.files["model.onnx"]) == 64
    assert m.training is not None and (m.training.onnx_parity_max_abs_diff or 0.0) < 1e-4


def test_hash_mismatch_refuses_with_the_fix(bundle_copy: Path) -> None:
    with (bundle_copy / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"sha256 of model.onnx does not match.*defense_models"):
        load_bundle(bundle_copy)


def test_missing_file_refuses(bundle_copy: Path) -> None:
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle_copy)


def test_missing_or_invalid_manifest_refuses(bundle_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="GATEWAY_ARTIFACTS"):
        load_bundle(tmp_path / "nowhere")
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not a valid manifest"):
        load_bundle(bundle_copy)


def test_unlisted_or_escaping_files_refuse(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["files"] = {"../model.onnx": raw["files"]["model.onnx"], "model.onnx": raw["files"]["model.onnx"]}
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle_copy)
    raw["files"] = {}
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="without a sha256"):
        load_bundle(bundle_copy)


def test_other_format_versions_and_renamed_training_fields_refuse(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    raw = json.loads(path.read_text())
    assert raw["format_version"] == 2 and raw["training"]["schema_version"] == 1
    path.write_text(json.dumps({**raw, "format_version": 1}))
    with pytest.raises(BundleError, match=r"format_version 1, this gateway reads 2.*defense_models"):
        load_bundle(bundle_copy)
    renamed = {**raw, "training": {**raw["training"], "parity_max_abs_diff": 0.0}}  # a field renamed by hand
    path.write_text(json.dumps(renamed))
    with pytest.raises(BundleError, match="parity_max_abs_diff"):
        load_bundle(bundle_copy)


def test_weights_are_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards that share a sub-model cache read each other's files: a write that dies half-way must leave the
    previous file whole (and no partial file under the real name)."""
    import safetensors.torch
    import torch

    from gateway.defenses.classifier import load_weights, save_weights

    path = tmp_path / "selena_000.safetensors"
    first = torch.nn.Linear(3, 2)
    save_weights(first, path)

    def dies_half_way(tensors: dict[str, torch.Tensor], filename: str) -> None:
        Path(filename).write_bytes(b"\0" * 7)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_weights(torch.nn.Linear(3, 2), path)
    monkeypatch.undo()
    loaded = load_weights(torch.nn.Linear(3, 2), path)
    assert torch.equal(loaded.weight, first.weight)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone too
