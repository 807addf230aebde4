"""AEPPT (Xue et al., "Use the Spear as a Shield", arXiv 2011.13696), batched over rows.

At serving time, y = f(x), t̂ = one-hot(argmax y) and m = [F(y, t̂) ≥ 0.5] for the substitute
membership model F. Then y is perturbed with BIM (Kurakin et al.) *away from* m:

    v₀ = y;   v_{k+1} = Clip_y(v_k + d·α·r_k·sign(∇_v F(v_k, t̂))),   d = −1 if m = 1 else +1
    Clip_y(v)_j = min(1, y_j + ε_c, max(0, y_j − ε_c, v_j))

for k = 0..K−1, then v/Σv. Every choice the paper leaves open is an option (``AepptParams``),
with the default's reason in its comment. The gradient of F is written out by hand (F is a ReLU
MLP), so an iteration is a few matmuls on the whole batch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.defenses import register_defense
from gateway.defenses._keyed import row_uniforms
from gateway.defenses.classifier import AepptSubstitute, load_weights


class AepptParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    #: α. Per dataset in the paper (illegible); calibrated by the offline job so the substitute's
    #: balanced accuracy on defended outputs is 0.5 ± 0.01, and stored in the manifest.
    step_size: float = Field(0.001, ge=0.0)
    #: K = 100: the attacker's loss levels off there (paper §5.4).
    iterations: int = Field(100, ge=0, le=10_000)
    #: ε_c of BIM's clip. None = ∞, i.e. only the box [0, 1]: the paper gives no bound and the
    #: L1 budget is governed by α·K instead.
    clip_eps: float | None = Field(None, gt=0.0)
    #: r_k ~ U[rand_low, rand_high), one draw per row per iteration. U[0, 1) is the plainest
    #: reading of "a random multiple of the step size"; the paper's range is illegible.
    rand_low: float = Field(0.0, ge=0.0)
    rand_high: float = Field(1.0, gt=0.0)
    #: fixed: d from F on the original y (the paper's Eq. 1–3). per_step: d re-read from F(v_k)
    #: every iteration, which makes rows hover near F = 0.5 (MemGuard-like).
    direction: Literal["fixed", "per_step"] = "fixed"
    #: Freeze a row once F has crossed 0.5 (off in the paper).
    early_stop: bool = False
    #: end: renormalise v/Σv after the loop so the release is a distribution (order-preserving).
    #: The paper's loop ignores the simplex, and at large α the final division undoes part of the
    #: push (measured: 99% of F's decisions flipped before it, 69% after, at α = 0.01); calibration
    #: accounts for this since it scores released vectors.
    #: step: renormalise after every step, so F always sees what will be released. Member-looking
    #: rows then cross F's boundary; the reverse push mostly cancels, as its sign-gradient is
    #: near-uniform and renormalisation removes it.
    #: none: leave v as is (parity runs only; the gateway's guard rejects rows off the simplex).
    renormalize: Literal["end", "step", "none"] = "end"
    #: keyed: r_k from the row's HMAC digest, so a repeated query gets the same answer. fresh:
    #: new draws per call — exposes the push direction to averaging; for comparisons in audits only.
    randomness: Literal["keyed", "fresh"] = "keyed"
    dtype: Literal["float32", "float64"] = "float32"

    @model_validator(mode="after")
    def _range(self) -> AepptParams:
        if self.rand_high <= self.rand_low:
            raise ValueError("rand_high must be above rand_low")
        return self


@register_defense
class Aeppt:
    name: ClassVar[str] = "aeppt"
    randomized: ClassVar[bool] = True

    def __init__(self, substitute: AepptSubstitute, params: AepptParams, device: torch.device) -> None:
        self.config = params
        self.device = device
        self.dtype = torch.float32 if params.dtype == "float32" else torch.float64
        w = {k: v.detach().to(device, self.dtype) for k, v in substitute.state_dict().items()}
        width = substitute.pred.out_features
        self.Wp, self.bp = w["pred.weight"], w["pred.bias"]  # [256, C], [256]
        self.Wl, self.bl = w["label.weight"], w["label.bias"]  # [256, C], [256]
        self.Wcp, self.Wcl, self.bc = (
            w["conn.weight"][:, :width],
            w["conn.weight"][:, width:],
            w["conn.bias"],
        )  # [64, 256] ×2
        self.Wo, self.bo = w["out.weight"][0], w["out.bias"]  # [64], [1]
        self.classes = substitute.classes

    @classmethod
    def from_bundle(cls, bundle: Any, overrides: dict[str, Any], device: torch.device) -> Aeppt:
        entry = bundle.manifest.defenses.get(cls.name)
        if entry is None or not entry.weights:
            raise ValueError("the bundle has no AEPPT substitute; train it with `defense_models train --defense aeppt`")
        sub = load_weights(AepptSubstitute(bundle.manifest.output.classes), bundle.path(entry.weights))
        return cls(sub, AepptParams.model_validate({**entry.params, **overrides}), device)

    def params(self) -> dict[str, Any]:
        return self.config.model_dump()

    @property
    def l1_bound(self) -> float:
        """Per-row L1 bound. Before renormalisation each coordinate moves at most min(ε_c, K·α·r_max, 1), so
        ‖v − y‖₁ ≤ D = C·that and S = Σv ∈ [1 − D, 1 + D]; then ‖v/S − y‖₁ ≤ ‖v − y‖₁/S + |1 − S|/S
        ≤ 2D/(1 − D). Capped at 2 (the simplex's diameter)."""
        p = self.config
        if p.renormalize == "step":
            return 2.0
        reach = p.iterations * p.step_size * p.rand_high
        if p.clip_eps is not None:
            reach = min(reach, p.clip_eps)
        D = self.classes * min(reach, 1.0)
        return 2.0 if D >= 0.5 else min(2.0, 2 * D / (1 - D))

    def substitute_logit(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """F's logit for v, t [N, C] -> [N]."""
        lab = torch.relu(torch.addmm(self.bl, t, self.Wl.t()))
        return self._head(v, torch.addmm(self.bc, lab, self.Wcl.t()))[0]

    def _head(self, v: torch.Tensor, label_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """v [N, C], label_part [N, 64] -> (logit [N], pred activations [N, 256], conn activations [N, 64])."""
        a = torch.relu(torch.addmm(self.bp, v, self.Wp.t()))  # [N, 256]
        c = torch.relu(torch.addmm(label_part, a, self.Wcp.t()))  # [N, 64]
        return c @ self.Wo + self.bo, a, c

    def multipliers(self, keys: torch.Tensor, n_rows: int) -> torch.Tensor:
        """r [B, K] in [rand_low, rand_high), from the rows' keys (or fresh entropy)."""
        p = self.config
        if p.randomness == "fresh":
            u = torch.rand(n_rows, p.iterations, device=self.device)
        else:
            u = row_uniforms(keys, p.iterations, device=self.device)
        return (p.rand_low + (p.rand_high - p.rand_low) * u).to(self.dtype)

    @torch.inference_mode()
    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        p = self.config
        B, C = probs.shape
        if B == 0 or p.iterations == 0 or p.step_size == 0:
            return probs
        y = probs.to(self.device, self.dtype)  # [B, C]
        labels = probs.argmax(dim=1).to(self.device)  # [B]
        t = torch.nn.functional.one_hot(labels, C).to(self.dtype)  # [B, C] t̂
        label_part = torch.addmm(self.bc, torch.relu(torch.addmm(self.bl, t, self.Wl.t())), self.Wcl.t())  # [B, 64]
        logit0 = self._head(y, label_part)[0]  # [B]
        member = logit0 >= 0  # m = [F ≥ 0.5]
        d = torch.where(member, -1.0, 1.0).to(self.dtype)  # [B]
        step = p.step_size * d[:, None] * self.multipliers(keys, B)  # [B, K] d·α·r_k
        if p.clip_eps is None:
            lo, hi = torch.zeros_like(y), torch.ones_like(y)
        else:
            lo, hi = (y - p.clip_eps).clamp_min(0.0), (y + p.clip_eps).clamp_max(1.0)
        rows = torch.arange(B, device=self.device)
        v = y.clone()
        frozen = torch.zeros(B, dtype=torch.bool, device=self.device)
        for k in range(p.iterations):
            logit, a, c = self._head(v, label_part)
            if p.direction == "per_step":
                step[:, k] = step[:, k].abs() * torch.where(logit >= 0, -1.0, 1.0).to(self.dtype)
            if p.early_stop:
                frozen |= (logit >= 0) != member
            # ∇_v F up to a positive factor (sigmoid' > 0): Wo → conn mask → Wcp → pred mask → Wp
            grad = (((self.Wo * (c > 0)) @ self.Wcp) * (a > 0)) @ self.Wp  # [B, C]
            cand = torch.minimum(torch.maximum(v + step[:, k, None] * torch.sign(grad), lo), hi)  # [B, C]
            if p.renormalize == "step":
                cand = cand / cand.sum(dim=1, keepdim=True)
            # Label guard: a step that would change or tie the argmax is undone and the row freezes.
            top = cand[rows, labels]
            rest = cand.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
            ok = top > rest
            frozen |= ~ok
            v = torch.where(frozen[:, None], v, cand)
        moved = (v != y).any(dim=1, keepdim=True)  # [B, 1]
        out = v.to(torch.float64)
        if p.renormalize != "none":
            out = out / out.sum(dim=1, keepdim=True)
        # A row that never moved is the clean vector itself, not its round trip through self.dtype.
        return torch.where(moved, out, probs.to(out.device, torch.float64))
