"""Extending the product from outside: a toy defense, attack and replacement, each registered from this
test module only, driven through the CLI (train, audit) without editing any other file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from defense_models.audit.attacks import REGISTRY as ATTACKS
from defense_models.audit.attacks import AttackData, register_attack
from defense_models.audit.schema import AuditReport, read
from defense_models.training.loop import fit
from defense_models.training.nets import mlp
from defense_models.training.replacements import REPLACEMENTS, Context
from gateway.artifacts import load_bundle
from gateway.defenses import REGISTRY as DEFENSES
from gateway.defenses import register_defense


class ToyBlend:
    """Blends every vector with the uniform one: keeps the argmax, stays on the simplex."""

    name: ClassVar[str] = "toy_blend"
    randomized: ClassVar[bool] = False

    def __init__(self, weight: float) -> None:
        self.weight = weight

    @classmethod
    def from_bundle(cls, bundle: Any, overrides: dict[str, Any], device: torch.device) -> ToyBlend:
        return cls(float(overrides.get("weight", 0.2)))

    @property
    def l1_bound(self) -> float:
        return 2 * self.weight

    def params(self) -> dict[str, Any]:
        return {"weight": self.weight}

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return (1 - self.weight) * probs + self.weight / probs.shape[1]  # [B, C]


class ToyMargin:
    """Top-1 minus top-2 probability."""

    name: ClassVar[str] = "toy_margin"
    reads_confidences: ClassVar[bool] = True

    def fit(self, members: AttackData, nonmembers: AttackData) -> None:
        pass

    def score(self, data: AttackData) -> np.ndarray:
        top = np.sort(data.probs, axis=1)
        return top[:, -1] - top[:, -2]


def toy_small(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A narrower network than the recipe's, with the recipe's fit."""
    hidden = int(params.get("hidden", 16))
    model = mlp(ctx.data.width, (hidden,), ctx.data.classes)
    fit(model, *ctx.members, ctx.fit_config, progress=False)
    return model, {"hidden": hidden}


@pytest.fixture
def registered() -> Iterator[None]:
    register_defense(ToyBlend)
    register_attack(ToyMargin)
    REPLACEMENTS.function("toy_small")(toy_small)
    yield
    DEFENSES.unregister("toy_blend")
    ATTACKS.unregister("toy_margin")
    REPLACEMENTS.unregister("toy_small")


def test_toy_defense_attack_and_replacement_run_through_the_cli(registered: None, tmp_path: Path) -> None:
    from defense_models.__main__ import main

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    np.savez(tmp_path / "data.npz", X=rng.normal(size=(400, 6)) + np.eye(3, 6)[y], y=y)
    data = ["--dataset", "tabular", "--data", str(tmp_path / "data.npz")]
    assert main(["train", *data, "--epochs", "5", "--defense", "none", "--replacement", "toy_small",
                 "--replacement-param", "hidden=8", "--quiet", "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    training = load_bundle(tmp_path / "b").manifest.training
    assert training is not None and training.replacement == {"kind": "toy_small", "hidden": 8}

    assert main(["audit", "--bundle", str(tmp_path / "b"), "--defense", "toy_blend", "--param", "weight=0.3",
                 "--attacks", "toy_margin", "gap", "--views", "shadow", "adaptive", "--shadow-epochs", "3",
                 "--quiet", "--no-plots", "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    report = read(AuditReport, tmp_path / "r" / "report.json")
    assert report.defense == "toy_blend" and report.defense_params == {"weight": 0.3}
    assert set(report.attacks) == {"shadow/toy_margin", "shadow/gap", "adaptive/toy_margin", "adaptive/gap"}
    assert report.utility.label_loss == 0 and report.utility.l1.mean > 0.1  # the toy defense moved every row
    assert report.summary.best_confidence_based is not None
    assert report.summary.best_confidence_based.attack.endswith("/toy_margin")  # it reads confidences
