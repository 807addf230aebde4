"""Cheap baseline post-processors, for comparison in audits. All keep the label and the simplex.

Unlike the Adversarial Robustness Toolbox's post-processors, they are correct on batches, renormalise, never emit an
all-zero row, keep the label as a strict maximum, and draw any noise from the row's keyed stream.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Self, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from gateway.defenses import register_defense
from gateway.defenses.keyed import row_uniforms


def _strict_label(v: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Raise the label's entry to max(others) + margin where it is not already the strict maximum."""
    top = v.gather(1, labels[:, None])[:, 0]  # [B]
    rest = v.scatter(1, labels[:, None], float("-inf")).amax(dim=1)  # [B]
    fixed = torch.where(top > rest, top, rest + margin)
    return v.scatter(1, labels[:, None], fixed[:, None])


def _renormalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.sum(dim=1, keepdim=True)


P = TypeVar("P", bound=BaseModel)


class _Base(Generic[P]):
    name: ClassVar[str]
    randomized: ClassVar[bool] = False
    l1_bound = 2.0
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: P) -> None:
        self.config = params

    @classmethod
    def from_bundle(cls, bundle: Any, overrides: dict[str, Any], device: torch.device) -> Self:
        entry = bundle.manifest.defenses.get(cls.name) if bundle is not None else None
        params: Any = cls.Params.model_validate({**(entry.params if entry else {}), **overrides})
        return cls(params)

    def params(self) -> dict[str, Any]:
        return self.config.model_dump()


class TopKParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    k: int = Field(3, ge=1)


@register_defense
class TopK(_Base[TopKParams]):
    """Keep the k largest entries (the label among them), zero the rest, renormalise; a label tied
    with a kept entry is nudged to a strict maximum."""

    name: ClassVar[str] = "topk"
    Params = TopKParams

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        k = min(self.config.k, probs.shape[1])
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(k, dim=1).indices, True)
        labels = probs.argmax(dim=1)
        keep.scatter_(1, labels[:, None], True)
        kept = torch.where(keep, probs, torch.zeros_like(probs))
        changed = (kept != probs).any(dim=1, keepdim=True)  # ties inside the top k need no nudge if nothing moved
        return torch.where(changed, _renormalise(_strict_label(kept, labels, 1e-12)), probs)


class RoundingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    decimals: int = Field(2, ge=0, le=12)


@register_defense
class Rounding(_Base[RoundingParams]):
    """Round to d decimals and renormalise; where rounding ties or zeroes the label, the label's
    entry is raised one grid step above the rest so it stays the strict maximum."""

    name: ClassVar[str] = "rounding"
    Params = RoundingParams

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        d = self.config.decimals
        v = torch.round(probs, decimals=d)
        return _renormalise(_strict_label(v, probs.argmax(dim=1), 10.0**-d))


class TemperatureParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    temperature: float = Field(2.0, gt=0)


@register_defense
class Temperature(_Base[TemperatureParams]):
    """softmax(z / T): order-preserving, so the label is kept; T > 1 flattens."""

    name: ClassVar[str] = "temperature"
    Params = TemperatureParams

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        out = torch.softmax(logits.to(probs.device, torch.float64) / self.config.temperature, dim=1)
        return _renormalise(_strict_label(out, probs.argmax(dim=1), 1e-12))


class NoParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@register_defense
class LabelOnly(_Base[NoParams]):
    """The one-hot label: the strongest output defense, and the floor every other one is judged by."""

    name: ClassVar[str] = "label_only"
    Params = NoParams

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(probs.argmax(dim=1), probs.shape[1]).to(probs.dtype)


class GaussianParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sigma: float = Field(0.05, ge=0)


@register_defense
class Gaussian(_Base[GaussianParams]):
    """Add N(0, σ²) from the row's keyed stream, clip at 0, renormalise, and keep the label by
    swapping the label's entry with the largest one (nudged to a strict maximum)."""

    name: ClassVar[str] = "gaussian"
    randomized: ClassVar[bool] = True
    Params = GaussianParams

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        C = probs.shape[1]
        u = row_uniforms(keys, 2 * C, stream=1, device=probs.device).double()  # [B, 2C]
        u1, u2 = u[:, :C].clamp_min(1e-12), u[:, C:]
        noise = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)  # Box–Muller [B, C]
        v = (probs + self.config.sigma * noise).clamp_min(0.0)
        labels = probs.argmax(dim=1)
        top = v.argmax(dim=1)
        vl, vt = v.gather(1, labels[:, None]), v.gather(1, top[:, None])
        v = v.scatter(1, top[:, None], vl).scatter(1, labels[:, None], vt)  # swap label <-> max
        return _renormalise(_strict_label(v, labels, 1e-9))  # the label's entry is ≥ 1e-9: no all-zero row
