"""Rank-preserving release: the label and the order of every class are the model's; the values are not.

Both defenses write a strictly decreasing vector v [C] that does not depend on the record into the query's
rank order: ``released[order[i]] = v[i]``, where ``order`` lists the classes by descending clean
probability (first index on ties, as ``argmax``). The label, top-k predictions and the whole ranking are
kept exactly; every confidence value is replaced (docs/ALGORITHMS.md §10).

* ``rank_template``: v is a template stored in the bundle, the mean of the sorted clean outputs of the
  defender's non-member rows, per predicted class (``per_class``; classes with too few non-member rows
  use the global template). Deterministic; a gather and a scatter per row.
* ``hamp``: HAMP's test-time step (Chen & Pattabiraman, NDSS 2024): v is the model's own output on a
  random input, sorted. The input is drawn from the row's keyed stream (binary features: uniform
  {0, 1}^D; else uniform in [low, high]^D), keyed by the input row whatever ``GATEWAY_NOISE_KEY`` says, so
  exact repeats agree and v carries nothing of the clean output; one extra forward pass per row, run by the
  pipeline on the same batch (``ModelBound``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from gateway.defenses import register_defense
from gateway.defenses.base import Predict
from gateway.defenses.keyed import row_uniforms

#: Neighbouring released values differ by at least this factor, so the order survives float32 clients.
STRICT_RATIO = 1e-5
#: ... and no released value is below this.
VALUE_FLOOR = 1e-12
#: Keyed stream of the random inputs (0: AEPPT's multipliers, 1: Gaussian noise, 3: MemGuard's landing side).
INPUT_STREAM = 2


def strictly_decreasing(values: torch.Tensor) -> torch.Tensor:
    """values [..., C], sorted descending -> the smallest lift v' ≥ values with v'_i ≥ v'_{i+1}·(1 + r), on the
    simplex. In log space: log v'_i = max_{j ≥ i}(log v_j + (j − i)·log(1 + r)), a reverse running maximum."""
    C = values.shape[-1]
    step = math.log1p(STRICT_RATIO)
    ramp = torch.arange(C, dtype=torch.float64, device=values.device) * step  # [C]
    w = torch.log(values.double().clamp_min(VALUE_FLOOR)) + ramp  # [..., C]
    lifted = torch.exp(w.flip(-1).cummax(dim=-1).values.flip(-1) - ramp)  # [..., C]
    return lifted / lifted.sum(dim=-1, keepdim=True)


def in_rank_order(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """probs [B, C]; values [B, C] strictly decreasing -> released [B, C] with released[order[i]] = values[i]."""
    order = torch.sort(probs, dim=1, descending=True, stable=True).indices  # [B, C], first index on ties
    return torch.empty_like(values).scatter_(1, order, values)


def sorted_template(probs: torch.Tensor) -> torch.Tensor:
    """probs [N, C] -> the mean of the rows sorted descending [C], strictly decreasing, on the simplex."""
    return strictly_decreasing(torch.sort(probs.double(), dim=1, descending=True).values.mean(dim=0))


def build_templates(nonmember_probs: torch.Tensor, min_rows: int = 10) -> dict[str, torch.Tensor]:
    """The defender's non-member outputs [N, C] -> {"per_class": [C, C], "global": [C]}: row k is the template
    of rows predicted k, or the global one where fewer than ``min_rows`` non-members are predicted k."""
    C = nonmember_probs.shape[1]
    glob = sorted_template(nonmember_probs)
    labels = nonmember_probs.argmax(dim=1)  # [N]
    per_class = glob.repeat(C, 1)  # [C, C]
    for k in range(C):
        rows = nonmember_probs[labels == k]
        if len(rows) >= min_rows:
            per_class[k] = sorted_template(rows)
    return {"per_class": per_class, "global": glob}


class RankTemplateParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    #: One template per predicted class (its non-members' mean sorted output), or one for every row.
    per_class: bool = True
    #: ``template``: every rank takes the template's value. ``flat``: ranks 2..C share the template's
    #: remaining mass equally (still strictly decreasing, by a factor 1 + 1e-5), so the value on a class
    #: says only whether it is the label, not how far down the ranking it sits.
    tail: Literal["template", "flat"] = "template"


@register_defense
class RankTemplate:
    name: ClassVar[str] = "rank_template"
    randomized: ClassVar[bool] = False
    l1_bound = 2.0
    WEIGHTS: ClassVar[str] = "rank_template.safetensors"

    def __init__(self, templates: dict[str, torch.Tensor], params: RankTemplateParams, device: torch.device) -> None:
        self.config = params
        per_class, glob = templates["per_class"], templates["global"]
        C = per_class.shape[1]
        table = per_class if params.per_class else glob[None].expand_as(per_class)  # [C, C]
        if table.ndim != 2 or table.shape[0] != table.shape[1] or not torch.isfinite(table).all():
            raise ValueError(f"rank templates must be a finite [C, C] table, got shape {tuple(table.shape)}")
        if params.tail == "flat":
            table = torch.cat([table[:, :1], table[:, 1:].mean(dim=1, keepdim=True).expand(-1, C - 1)], dim=1)
        self.table = strictly_decreasing(table).to(device)  # [C, C]: row k, the values for label k

    @classmethod
    def from_bundle(cls, bundle: Any, overrides: dict[str, Any], device: torch.device) -> Self:
        from safetensors.torch import load_file

        entry = bundle.manifest.defenses.get(cls.name)
        if entry is None or not entry.weights:
            raise ValueError("the bundle has no rank templates; rebuild it with `defense_models train` (or `export`)")
        params = RankTemplateParams.model_validate({**entry.params, **overrides})
        templates = load_file(str(bundle.path(entry.weights)))
        if templates["per_class"].shape[0] != bundle.manifest.output.classes:
            raise ValueError(f"{entry.weights} holds templates for {templates['per_class'].shape[0]} classes, the "
                             f"model has {bundle.manifest.output.classes}; rebuild the bundle")  # fmt: skip
        return cls(templates, params, device)

    def params(self) -> dict[str, Any]:
        return self.config.model_dump()

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        values = self.table.to(probs.device)[probs.argmax(dim=1)]  # [B, C]
        return in_rank_order(probs, values)


class HampParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    #: The random input's distribution: ``binary`` (each feature 0 or 1 with probability ½, HAMP's choice
    #: for binary features) or ``uniform`` in [low, high] per feature.
    inputs: Literal["binary", "uniform"] = "binary"
    low: float = 0.0
    high: float = 1.0


@register_defense
class Hamp:
    name: ClassVar[str] = "hamp"
    randomized: ClassVar[bool] = True
    #: v must not depend on the clean output: keyed by it, the saturated members of a class shared one v (on an
    #: overconfident user model, 300 members got 71 distinct top values, 600 non-members 353, and a per-class
    #: confidence threshold read 0.64 against a label-only floor of 0.61). Averaging jittered copies gains
    #: nothing without the output key: each copy's v is another draw from the same distribution.
    input_keyed: ClassVar[bool] = True
    l1_bound = 2.0

    def __init__(self, params: HampParams, device: torch.device) -> None:
        if params.high < params.low:
            raise ValueError(f"hamp: high ({params.high}) is below low ({params.low})")
        self.config = params
        self.device = device
        self._predict: Predict | None = None
        self._features = 0

    @classmethod
    def from_bundle(cls, bundle: Any, overrides: dict[str, Any], device: torch.device) -> Self:
        entry = bundle.manifest.defenses.get(cls.name) if bundle is not None else None
        return cls(HampParams.model_validate({**(entry.params if entry else {}), **overrides}), device)

    def params(self) -> dict[str, Any]:
        return self.config.model_dump()

    def bind_model(self, predict: Predict, features: int) -> None:
        self._predict, self._features = predict, features

    def random_inputs(self, keys: torch.Tensor) -> np.ndarray:
        """keys [B, 32] -> X [B, D] float32, a pure function of each row's key."""
        u = row_uniforms(keys, self._features, stream=INPUT_STREAM, device=torch.device("cpu")).numpy()  # [B, D]
        p = self.config
        if p.inputs == "binary":
            return (u < 0.5).astype(np.float32)
        return (p.low + (p.high - p.low) * u).astype(np.float32)

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self._predict is None:
            raise RuntimeError("hamp runs the model on random inputs; bind_model() was never called")
        if probs.shape[0] == 0:
            return probs
        reference = torch.from_numpy(np.asarray(self._predict(self.random_inputs(keys)), np.float64))  # [B, C]
        values = strictly_decreasing(torch.sort(reference.to(probs.device), dim=1, descending=True).values)
        return in_rank_order(probs, values)
