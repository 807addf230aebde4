"""The defenses on CUDA: same invariants, and the same answers as on CPU. Skipped without a GPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gateway.defenses.aeppt import Aeppt, AepptParams
from gateway.defenses.memguard import MemGuard, MemGuardParams
from tests.conftest import keys_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", ["memguard", "aeppt"])
def test_cuda_matches_cpu_and_keeps_invariants(name: str, defenders: dict[str, Any]) -> None:
    z = torch.cat([defenders["z_in"][:64], defenders["z_out"][:64]]).float()
    probs = torch.softmax(z.double(), 1)
    keys = keys_for(z)
    out = {}
    for dev in ("cpu", "cuda"):
        device = torch.device(dev)
        defense = (
            MemGuard(defenders["g"], MemGuardParams(epsilon=0.5, dtype="float64"), device)
            if name == "memguard"
            else Aeppt(
                defenders["substitute"],
                AepptParams(step_size=defenders["calibration"].step_size, dtype="float64"),
                device,
            )
        )
        out[dev] = defense.defend(probs.to(device), z.to(device), keys).cpu()
    gpu = out["cuda"]
    assert torch.isfinite(gpu).all() and (gpu >= 0).all()
    assert ((gpu.sum(1) - 1).abs() <= 1e-6).all()
    assert torch.equal(gpu.argmax(1), probs.argmax(1))
    close = ((gpu - out["cpu"]).abs().max(1).values <= 1e-6).float().mean().item()
    assert close >= 0.98, close  # float64 on both devices; rare stop-test flips at rounding level
