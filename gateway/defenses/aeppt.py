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
from gateway.defenses._masks import bit_weights, changed_rows, signature
from gateway.defenses.base import flush_subnormals
from gateway.defenses.classifier import AepptSubstitute, load_weights
from gateway.defenses.keyed import row_uniforms

Tensor = torch.Tensor


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
    #: A batch of one row on CPU: ``compiled`` (one Numba loop, ``_aeppt_kernel``: the release path 1.08 against
    #: 3.49 ms on the demo bundle, bench/release_cost.py) or ``torch`` (the batched PyTorch path; the process then
    #: never loads numba, ~130 MiB of RSS).
    engine: Literal["compiled", "torch"] = "compiled"

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
        self.WpT, self.WcpT = self.Wp.t().contiguous(), self.Wcp.t().contiguous()  # [C, 256], [256, 64]
        self.classes = substitute.classes
        # Large batches fold both biases into the GEMMs (addmm's broadcast copy of the bias is a full
        # extra pass over [B, 256]): [v, 1] @ [Wpᵀ; bp], and [a, t̂] @ [Wcpᵀ; T] with T[c] the label
        # branch's output for class c, so t̂ @ T is each row's label part.
        C = self.classes
        eye = torch.eye(C, device=device, dtype=self.dtype)
        table = torch.addmm(self.bc, torch.relu(torch.addmm(self.bl, eye, self.Wl.t())), self.Wcl.t())  # [C, 64]
        self.W1_aug = torch.cat([self.WpT, self.bp[None]]).contiguous()  # [C + 1, 256]
        self.Wc_aug = torch.cat([self.WcpT, table]).contiguous()  # [256 + C, 64]
        self.WoWcp = (self.Wo[:, None] * self.Wcp).contiguous()  # [64, 256]
        self.bits = [bit_weights(n, device, self.dtype) for n in (width, self.Wcp.shape[0])]
        # Zero-copy NumPy views for the single-row path (``_iterate_row``): CPU only.
        self._np = None if device.type != "cpu" else tuple(
            t.numpy() for t in (self.WpT, self.bp, self.WcpT, self.Wcp, self.Wp, self.Wo)
        )  # fmt: skip
        p = params
        plain = p.engine == "compiled" and p.direction == "fixed" and not (p.early_stop or p.renormalize == "step")
        self._row_loop = self._np is not None and plain  # batch 1 runs ``_iterate_row``
        if self._row_loop:  # compile it now, not at the first request (_jit)
            y = torch.full((1, C), 1 / C, dtype=self.dtype)
            self._iterate_row(y, torch.zeros(1, dtype=torch.int64), torch.zeros(1, self.Wcp.shape[0], dtype=self.dtype),
                              torch.ones(1, dtype=self.dtype), torch.zeros(1, 0, dtype=self.dtype), y, y)  # fmt: skip

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
        return self.perturb(probs, keys)[0]

    @torch.inference_mode()
    @flush_subnormals()
    def perturb(self, probs: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, int]:
        """probs [B, C] float64, keys [B, 32] -> (released [B, C] float64, row-iterations run)."""
        p = self.config
        B, C = probs.shape
        if B == 0 or p.iterations == 0 or p.step_size == 0:
            return probs, 0
        y = probs.to(self.device, self.dtype)  # [B, C]
        labels = probs.argmax(dim=1).to(self.device)  # [B]
        t = torch.nn.functional.one_hot(labels, C).to(self.dtype)  # [B, C] t̂
        label_part = torch.addmm(self.bc, torch.relu(torch.addmm(self.bl, t, self.Wl.t())), self.Wcl.t())  # [B, 64]
        member = self._head(y, label_part)[0] >= 0  # [B] m = [F(y, t̂) ≥ 0.5]
        d = torch.where(member, -1.0, 1.0).to(self.dtype)  # [B]
        delta = p.step_size * self.multipliers(keys, B)  # [B, K] α·r_k ≥ 0
        if p.clip_eps is None:
            lo, hi = torch.zeros_like(y), torch.ones_like(y)
        else:
            lo, hi = (y - p.clip_eps).clamp_min(0.0), (y + p.clip_eps).clamp_max(1.0)
        if B == 1 and self._row_loop:
            v = self._iterate_row(y, labels, label_part, d, delta, lo, hi)
        else:
            v = self._iterate(y, labels, label_part, member, d, delta, lo, hi)
        work = B * p.iterations
        moved = (v != y).any(dim=1, keepdim=True)  # [B, 1]
        out = v.to(torch.float64)
        if p.renormalize != "none":
            out = out / out.sum(dim=1, keepdim=True)
        # A row that never moved is the clean vector itself, not its round trip through self.dtype.
        return torch.where(moved, out, probs.to(out.device, torch.float64)), work

    def _sign_rows(self, ma: torch.Tensor, mc: torch.Tensor) -> torch.Tensor:
        """sign(∇_v F) [n, C] from F's float ReLU masks ma [n, 256] and mc [n, 64]:
        ((mc @ (Wo ⊙ Wcp)) ⊙ ma) @ Wp, two GEMMs and one pass."""
        sign: Tensor = ((mc @ self.WoWcp).mul_(ma) @ self.Wp).sign_()
        return sign

    def _iterate(self, y: Tensor, labels: Tensor, label_part: Tensor, member: Tensor, d: Tensor, delta: Tensor,
                 lo: Tensor, hi: Tensor) -> Tensor:  # fmt: skip
        """The K updates over the whole batch. y, lo, hi [B, C]; delta [B, K] = α·r_k ≥ 0 -> v [B, C].

        Equivalent to the update as written, with three shortcuts that do not change any result:
        a frozen row gets zero steps (so no masking per iteration); F's logit is only computed when
        the direction or early stop needs it; and the label guard's exact test only runs once a
        row's margin could have closed: each step moves every coordinate by at most α·r_k, so the
        label's lead shrinks by at most 2·α·r_k per step. Each step: forward (F's activations), the
        direction and early stop if asked, sign(∇_v F) (reused while the masks hold), the clipped step,
        the label guard.
        """
        p = self.config
        walk = _Walk(self, y, labels, label_part, d, delta)
        for k in range(p.iterations):
            a, pc = walk.forward()
            if p.direction == "per_step" or p.early_stop:
                logit = pc.clamp_min(0) @ self.Wo + self.bo  # [B]
                if p.direction == "per_step":
                    walk.step[:, k] = walk.delta[:, k] * torch.where(logit >= 0, -1.0, 1.0).to(self.dtype)
                if p.early_stop:
                    self._freeze(((logit >= 0) != member) & ~walk.frozen, walk.frozen, walk.delta, walk.step)
            sign = walk.sign(a, pc)
            cand = walk.candidate(k, sign, lo, hi)
            walk.guard(k, cand)
            walk.v = cand
        return walk.v

    def _iterate_row(self, y: Tensor, labels: Tensor, label_part: Tensor, d: Tensor, delta: Tensor, lo: Tensor,
                     hi: Tensor) -> Tensor:  # fmt: skip
        """``_iterate`` for one row on CPU, as one compiled loop (``_aeppt_kernel``): the same updates, label
        guard and box. At batch 1 an update is two small matrix-vector products, and PyTorch's or NumPy's
        per-call cost was most of its time. Only the fixed direction without early stop or per-step
        renormalisation takes this path (the defaults); results agree with the batched path to float
        rounding (tested). y, lo, hi [1, C]; delta [1, K] -> v [1, C].
        """
        from gateway.defenses._aeppt_kernel import iterate_row

        WpT, bp, WcpT, Wcp, Wp, Wo = self._np  # type: ignore[misc]
        v = y[0].numpy().copy()  # [C]
        eps = 4 * torch.finfo(self.dtype).eps  # the rounding allowance of ``_iterate``
        shrink = (2 * delta[0].double() + eps).numpy()  # [K]
        steps = (d[0] * delta[0]).numpy()  # [K] d·α·r_k, in the defense's dtype
        iterate_row(v, int(labels[0]), label_part[0].numpy(), WpT, bp, WcpT, Wcp, Wp, Wo, lo[0].numpy(),
                    hi[0].numpy(), steps, shrink)  # fmt: skip
        return torch.from_numpy(v)[None]

    @staticmethod
    def _margin(v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[N] the label's lead over the largest other entry of v [N, C] (> 0: strict maximum)."""
        top = v.gather(1, labels[:, None])[:, 0]
        return top - v.scatter(1, labels[:, None], float("-inf")).amax(dim=1)

    @staticmethod
    def _freeze(rows: torch.Tensor, frozen: torch.Tensor, delta: torch.Tensor, step: torch.Tensor) -> None:
        """Freeze rows (a [B] mask or indices) in place: they take no further steps."""
        idx = rows.nonzero()[:, 0] if rows.dtype == torch.bool else rows
        if idx.numel():
            frozen[idx] = True
            delta.index_fill_(0, idx, 0)
            step.index_fill_(0, idx, 0)


class _Walk:
    """The state of ``Aeppt._iterate`` over one batch: the iterate v [B, C], frozen rows, the label guard's
    schedule, and sign(∇_v F) with what it was computed from.

    Small batches (≤ 64 rows) run matmul + in-place bias and reuse the sign for the whole batch while no row's
    masks change; larger ones fold the biases into the GEMMs (ping-pong buffers [v, 1] and one [a, t̂]) and,
    on CPU, recompute the sign only for the rows whose masks changed (a fifth to a third per step).
    """

    def __init__(self, aeppt: Aeppt, y: Tensor, labels: Tensor, label_part: Tensor, d: Tensor,
                 delta: Tensor) -> None:  # fmt: skip
        self.f, self.labels, self.label_part = aeppt, labels, label_part
        B, C = y.shape
        self.delta = delta.clone()  # [B, K]
        self.step = d[:, None] * self.delta  # [B, K] d·α·r_k
        self.step_k = self.step.unsqueeze(2).unbind(1)  # K × [B, 1] views: freezing (zeroing rows) reaches them
        # The label's lead shrinks by at most 2·α·r_k per step (every coordinate moves at most α·r_k, plus a
        # rounding allowance), so a row's exact test can wait until its last measured lead, less the largest
        # possible shrink since, could have reached 0. Per row: key = lead + G at measurement, with G_k the
        # cumulative shrink (plain floats); a row is due at step k once key ≤ G_k, and only due rows are
        # measured. Frozen rows have key = ∞.
        eps = 4 * torch.finfo(aeppt.dtype).eps
        self.G = torch.cumsum(2 * self.delta.amax(dim=0).double() + eps, 0).tolist()  # K floats
        self.reuse = B <= 64
        if self.reuse:
            self.v = y.clone()
        else:
            self.bufs = [torch.ones(B, C + 1, device=aeppt.device, dtype=aeppt.dtype) for _ in range(2)]
            self.bufs[0][:, :C] = y
            self.v, self.cur = self.bufs[0][:, :C], 0
            width = aeppt.WpT.shape[1]
            self.a_t = torch.empty(B, width + C, device=aeppt.device, dtype=aeppt.dtype)
            self.a_t[:, width:] = torch.nn.functional.one_hot(labels, C)
            self.a = self.a_t[:, :width]  # [B, 256] view
        self.frozen = torch.zeros(B, dtype=torch.bool, device=aeppt.device)
        self.key = aeppt._margin(self.v, labels).double()  # [B]
        self.due_at = float(self.key.min())
        self._sign: Tensor | None = None
        self._prev_ma = self._prev_mc = torch.empty(0)
        self._prev_sig: Tensor | None = None

    def forward(self) -> tuple[Tensor, Tensor]:
        """F's prediction-branch activations a [B, 256] and connection pre-activations pc [B, 64] at v."""
        f = self.f
        if self.reuse:
            a = torch.matmul(self.v, f.WpT).add_(f.bp).clamp_min_(0)
            return a, torch.addmm(self.label_part, a, f.WcpT)
        torch.mm(self.bufs[self.cur], f.W1_aug, out=self.a).clamp_min_(0)
        return self.a, torch.mm(self.a_t, f.Wc_aug)

    def sign(self, a: Tensor, pc: Tensor) -> Tensor:
        """sign(∇_v F) [B, C]: Wo → connection mask → Wcp → prediction mask → Wp. It depends on the ReLU
        masks only (float masks in {0, 1}, computed in place over a and pc)."""
        f = self.f
        ma, mc = a.sign_(), pc.clamp_min_(0).sign_()  # [B, 256], [B, 64]
        if self.reuse:
            if self._sign is None or not (torch.equal(mc, self._prev_mc) and torch.equal(ma, self._prev_ma)):
                self._sign = (((mc * f.Wo) @ f.Wcp).mul_(ma) @ f.Wp).sign_()
                self._prev_ma, self._prev_mc = ma, mc
            return self._sign
        # Only on CPU: on CUDA the full recompute is cheaper than the host syncs row selection needs.
        sig = signature([ma, mc], f.bits) if f.device.type == "cpu" else None
        rows = None if self._sign is None or sig is None else changed_rows(sig, self._prev_sig)
        if rows is None or self._sign is None:
            self._sign = f._sign_rows(ma, mc)
        elif rows.numel():
            self._sign.index_copy_(0, rows, f._sign_rows(ma.index_select(0, rows), mc.index_select(0, rows)))
        self._prev_sig = sig
        return self._sign

    def candidate(self, k: int, sign: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """v + d·α·r_k·sign, clipped to the box (and renormalised with ``renormalize="step"``)."""
        if self.reuse:
            cand = torch.addcmul(self.v, self.step_k[k], sign)  # [B, C]
        else:
            self.cur = 1 - self.cur
            C = self.v.shape[1]
            cand = torch.addcmul(self.v, self.step_k[k], sign, out=self.bufs[self.cur][:, :C])
        cand = cand.clamp_(0.0, 1.0) if self.f.config.clip_eps is None else torch.clamp(cand, lo, hi, out=cand)
        if self.f.config.renormalize == "step":
            cand.div_(cand.sum(dim=1, keepdim=True))
        return cand

    def guard(self, k: int, cand: Tensor) -> None:
        """Undo, in ``cand``, the step of every due row whose label would change or tie, and freeze it."""
        every = self.f.config.renormalize == "step"  # renormalising moves every coordinate: test every row
        if not every and self.G[k] < self.due_at:
            return
        due = (~self.frozen).nonzero()[:, 0] if every else (self.key <= self.G[k]).nonzero()[:, 0]  # [n]
        margin = self.f._margin(cand[due], self.labels[due])  # [n]
        bad = margin <= 0
        if bool(bad.any()):
            rows = due[bad]
            cand[rows] = self.v[rows]
            self.f._freeze(rows, self.frozen, self.delta, self.step)
        self.key[due] = torch.where(bad, float("inf"), margin.double() + self.G[k])
        self.due_at = float(self.key.min())
