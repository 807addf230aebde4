"""OnnxRunner: the provider actually used is read back; the expected CUDA error stays out of the log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.artifacts import load_bundle
from gateway.runner import CPU, CUDA, OnnxRunner
from tests.conftest import WIDTH, tiny_model


def make_runner(bundle: Path, **kw: object) -> OnnxRunner:
    m = load_bundle(bundle).manifest
    return OnnxRunner(bundle / m.model_file, input_name=m.input.name, output_name=m.output.name, **kw)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_fallback_is_reported_and_quiet(tiny_bundle: Path, capfd: pytest.CaptureFixture[str]) -> None:
    runner = make_runner(tiny_bundle)
    assert runner.provider == CPU
    err = capfd.readouterr().err
    assert "Failed to load library" not in err and "libcublas" not in err


def test_runner_matches_torch(tiny_bundle: Path) -> None:
    runner = make_runner(tiny_bundle, intra_op_threads=1)
    x = np.random.default_rng(0).normal(size=(33, WIDTH)).astype(np.float32)
    with torch.no_grad():
        want = tiny_model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.run(x), want, atol=1e-5)
    assert runner.run(x[:0]).shape == (0, want.shape[1])


def test_spinning_setting_reaches_the_session(tiny_bundle: Path) -> None:
    for allow, want in ((False, "0"), (True, "1")):
        options = make_runner(tiny_bundle, allow_spinning=allow)._session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == want


def test_cpu_only_when_cuda_not_preferred(tiny_bundle: Path) -> None:
    assert make_runner(tiny_bundle, prefer_cuda=False).provider == CPU


def test_wrong_tensor_names_are_refused(tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    with pytest.raises(ValueError, match="rebuild the bundle"):
        OnnxRunner(tiny_bundle / m.model_file, input_name="x", output_name=m.output.name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_provider_is_used_when_present(tiny_bundle: Path) -> None:
    assert make_runner(tiny_bundle).provider == CUDA
