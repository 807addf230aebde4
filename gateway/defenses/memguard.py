"""MemGuard (Jia et al., CCS 2019), batched over rows; the same code on CPU and CUDA.

**Phase I** follows the official ``defense_framework.py`` exactly, per row, in ascending-sorted
coordinates (label last) on the target's logits z̃:

    L(e; c3) = c1·|h(softmax(z̃+e))| + c2·ReLU(max_{j<C-1}(z̃+e)_j − (z̃+e)_{C-1}) + c3·‖softmax(z̃+e) − s̃‖₁

* c1 = 1 (find a point where g's logit h is 0, i.e. g = 0.5), c2 = 10 (the label penalty),
  c3 = 0.1, 1, …, 1e5: seven rounds, each restarting from e = 0. A larger c3 buys less
  distortion; the official loop keeps the last round of an unbroken run of successes.
* Step: e ← e − 0.1·∇L/‖∇L‖₂ (with a zero-norm guard the reference lacks).
* A round always takes its first step, then stops at the first step after which the label is a
  strict maximum and h has reached or crossed 0 (h·h₀ ≤ 0), or after 299 steps.
* No noise when |g(s) − 0.5| ≤ 1e-5 already, or when the c3 = 0.1 round fails.
* Coordinates are sorted once and never re-sorted inside the loop; the result is un-sorted.

The rounds are deterministic and independent per row, so they may run side by side (7B entries at
once, ``schedule="parallel"``) or one after another per row (``"sequential"``): a row whose round
succeeds restarts from e = 0 in the next round at the next step, without waiting for the rest of the
batch, and rounds after its first failure never run. Both give the same answer. Sequential does 3-4x
less work (most rows fail one round, which costs the full 299 steps, and in parallel every row runs all
seven) for ~1.2x the steps; ``"auto"`` runs sequentially on CPU, and side by side on a GPU for batches up
to ``parallel_max_rows``. Rows that finish leave the working set, so a batch costs what its rows actually
need. Gradients are written out by hand (g is a ReLU MLP) into tensors allocated once per working set,
which keeps one step to a handful of matmuls and elementwise passes instead of an autograd graph. On CPU
the rounds run one after another in a compiled loop instead (``_memguard_kernel``, Numba; ``engine``):
the same steps without PyTorch's per-op cost, which was half of a batch-32 step.

**Phase II** [``evaluate_nn_attack.py``; paper §4]: with d = ‖s′ − s‖₁, release s′ with
probability p = min(ε/d, 1) if the noise moves g towards 0.5 (|g(s) − 0.5| > |g(s′) − 0.5|),
else p = 0. So E‖released − s‖₁ ≤ ε per row. The coin is the row's keyed uniform (first 53
bits of its HMAC digest), so a repeated query gets the same answer and averaging gains nothing.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gateway.defenses import register_defense
from gateway.defenses._masks import bit_weights, changed_rows, signature
from gateway.defenses.base import flush_subnormals
from gateway.defenses.classifier import MemGuardClassifier, load_weights
from gateway.defenses.keyed import row_uniforms, uniform_from_digest

#: Official constants [code defense_framework.py]: c1 finds g = 0.5 (the step's gradient takes c1 = 1 as
#: written), c2 keeps the label.
C1, C2 = 1.0, 10.0
#: c3 schedule: 0.1 ×10 up to 1e5 — seven rounds.
C3_SCHEDULE = (0.1, 1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0)
#: |g(s) − 0.5| at or below this: already at the decision boundary, no noise ("for numerical reason").
NO_NOISE_TOLERANCE = 1e-5
#: Keyed stream of the side a ``boundary`` landing keeps.
LANDING_STREAM = 3


class MemGuardParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    #: Expected-L1 budget of the released noise (Phase II). 0 disables the defense. Default 1.0:
    #: the largest budget of the published Location curve.
    epsilon: float = Field(1.0, ge=0.0, le=2.0)
    #: 300 is the official bound on the loop counter, so at most 299 steps per round.
    max_iterations: int = Field(300, ge=2)
    step_size: float = Field(0.1, gt=0)
    schedule: Literal["auto", "parallel", "sequential"] = "auto"
    #: Rows (×7 rounds) up to which "auto" runs rounds side by side on a GPU (never on CPU).
    parallel_max_rows: int = Field(64, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    #: How Phase I runs on CPU when rounds run one after another: ``compiled`` (the Numba loop in
    #: ``_memguard_kernel``, 2x faster at batch 32 on the demo bundle) or ``torch`` (the PyTorch loop that
    #: CUDA runs; the process then never loads numba, ~130 MiB of RSS). The same steps; in float32 a row's
    #: trajectory can differ by rounding between the two (docs/ALGORITHMS.md §3), so replicas that must agree
    #: run the same engine. Compiled serves every batch size, although the PyTorch loop is faster from ~200
    #: rows: a row's answer must not depend on the batch it landed in.
    engine: Literal["compiled", "torch"] = "compiled"
    #: Where Phase I's noise lands. ``crossed`` (the published algorithm): the first step past g's
    #: decision, which overshoots to the other side, so the released vector inverts g's verdict and an
    #: attacker who checks the orientation reads the inversion. ``boundary``: bisect the segment from the
    #: clean logits to that point down to g = 0.5 and release one end of the last bracket, the side drawn
    #: from the row's keyed stream (docs/ALGORITHMS.md §3). [default ``boundary``: no view of the audit is
    #: worse than with ``crossed``, and the flipped attacker loses its signal; docs/RESULTS.md]
    landing: Literal["crossed", "boundary"] = "boundary"
    #: Bisection steps of ``boundary`` (the bracket shrinks 2^-steps of the segment).
    landing_steps: int = Field(24, ge=1, le=60)
    #: A faster schedule (not the published one): at most this many steps in every round after the first. A
    #: later round that needs more counts as failed, so the row keeps an earlier round's noise (a smaller c3:
    #: more distortion, the same target g = 0.5). Most rows fail one round, which costs the full 299 steps;
    #: this caps it. None: the official schedule. [audited: docs/RESULTS.md, "A faster MemGuard schedule"]
    later_round_steps: int | None = Field(None, ge=1)


@dataclass
class PhaseOne:
    noisy_logits: torch.Tensor  # [B, C] z + e in the original coordinates (= z where no noise)
    has_noise: torch.Tensor  # [B] bool
    rounds_ok: torch.Tensor  # [B] int: length of the unbroken run of successful rounds (0..7)
    steps: torch.Tensor  # [R, B] int: steps taken per round (0 for rounds not run)
    success: torch.Tensor  # [R, B] bool: per-round success (False for rounds not run)
    h0: torch.Tensor  # [B] logit of g on the clean sorted vector
    row_iterations: int  # Σ over steps of rows in the working set (for FLOP accounting)


class _G:
    """g's weights as plain tensors, with a batched forward/backward (ReLU MLP).

    ``forward`` and ``input_grad`` write into preallocated tensors when given them (``Buffers``): Phase I
    runs them hundreds of times on the same working set, where allocation and the per-op cost, not the
    FLOPs, decide the time of a small batch."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], log_floor: float = 0.0) -> None:
        self.layers = layers
        self.transposed = [W.t().contiguous() for W, _ in layers]  # [in, out]: no transpose per call
        self.log_floor = log_floor  # > 0: the first layer reads log(s + log_floor)
        self.bits = [bit_weights(W.shape[0], W.device, W.dtype) for W, _ in layers[:-1]]

    def logit(self, s: torch.Tensor) -> torch.Tensor:
        return self.forward(s)[0]

    def chain(self, grad_x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """dL/ds [N, C] from dL/d(first layer input) [N, C]: itself, or divided by s + floor (in place)."""
        return grad_x.div_(s + self.log_floor) if self.log_floor > 0 else grad_x

    def forward(self, s: torch.Tensor, out: Buffers | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """s [N, C] -> (h [N], hidden activations [a1 [N,256], a2 [N,128], a3 [N,64]])."""
        outs = out.acts if out is not None else [None] * len(self.layers)  # [a1, a2, a3, h [N, 1]]
        acts, x = [], torch.log(s + self.log_floor) if self.log_floor > 0 else s
        for (_, b), Wt, o in zip(self.layers[:-1], self.transposed, outs, strict=False):
            x = torch.addmm(b, x, Wt, out=o).clamp_min_(0)  # ReLU in place: one pass fewer over [N, width]
            acts.append(x)
        return torch.addmm(self.layers[-1][1], x, self.transposed[-1], out=outs[-1])[:, 0], acts

    def jacobian(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """∂h/∂x [N, C] (x: the first layer's input, s or log(s + floor); ``chain`` makes it ∂h/∂s) from the
        float ReLU masks [m1 [N,256], m2 [N,128], m3 [N,64]] in {0, 1}.

        Equals ``input_grad`` with dh = 1 bit for bit (the same GEMM operands), and input_grad(±1) =
        ±jacobian exactly.
        """
        g = masks[-1] * self.layers[-1][0]  # [N, 64] w_out where the last hidden unit is on
        for (W, _), m in zip(reversed(self.layers[1:-1]), reversed(masks[:-1]), strict=True):
            g = (g @ W).mul_(m)  # [N, in]
        return g @ self.layers[0][0]  # [N, C]

    def input_grad(self, dh: torch.Tensor, acts: list[torch.Tensor], out: Buffers | None = None) -> torch.Tensor:
        """dL/dx [N, C] (the first layer's input; ``chain`` makes it dL/ds) given dL/dh [N] and the activations."""
        outs = out.grads if out is not None else [None] * len(self.layers)  # [[N,64], [N,128], [N,256], [N,C]]
        g = torch.mul(dh[:, None], self.layers[-1][0], out=outs[0])  # [N, 64]
        for (W, _), a, o in zip(reversed(self.layers[:-1]), reversed(acts), outs[1:], strict=True):
            # ReLU' as one fused pass, in place (g is this step's own product); [N, in]
            g = torch.mm(torch.ops.aten.threshold_backward.grad_input(g, a, 0, grad_input=g), W, out=o)
        return g


#: Phase I's Jacobian reuse on CPU: (∂h/∂s per working row [n, C], the ReLU patterns it belongs to [n, 20],
#: whether reuse still pays in this round).
ReuseState = tuple[torch.Tensor | None, torch.Tensor | None, bool]


@dataclass
class _Entries:
    """Phase I's working set: one entry per (row, round) in flight, all [n] or [n, C]."""

    ids: torch.Tensor  # [n] batch row
    rnd: torch.Tensor  # [n] round
    deadline: torch.Tensor  # [n] step at which its round times out (far future once finished)
    x: torch.Tensor  # [n, C] z̃ + e, this loop's own copy
    s_ref: torch.Tensor  # [n, C] s̃
    h_ref: torch.Tensor  # [n] g's clean logit h0 (NaN once finished)
    c3w: torch.Tensor  # [n, 1] the round's c3
    live: torch.Tensor  # [n] bool
    n_live: int

    #: The deadline of a finished entry: its round never times out.
    NEVER: ClassVar[int] = 2**62

    @classmethod
    def start(cls, ids: torch.Tensor, rnd: torch.Tensor, zs: torch.Tensor, ss: torch.Tensor, h0: torch.Tensor,
              c3_of: torch.Tensor, limits: torch.Tensor) -> _Entries:  # fmt: skip
        """limits [R]: the most steps each round may take."""
        live = torch.ones_like(ids, dtype=torch.bool)
        return cls(ids, rnd, limits[rnd], zs[ids], ss[ids], h0[ids], c3_of[rnd][:, None], live, ids.numel())

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    def retire(self, gone: torch.Tensor) -> None:
        """Entries [n] bool that stop: never reach nor time out again, and leave at the next compaction."""
        gone = gone & self.live
        self.live = self.live & ~gone
        self.n_live -= int(gone.sum())
        self.h_ref = self.h_ref.masked_fill(gone, float("nan"))
        self.deadline = self.deadline.masked_fill(gone, self.NEVER)

    def keep(self, mask: torch.Tensor) -> _Entries:
        return _Entries(self.ids[mask], self.rnd[mask], self.deadline[mask], self.x[mask], self.s_ref[mask],
                        self.h_ref[mask], self.c3w[mask], self.live[mask], self.n_live)  # fmt: skip


def _keep_reuse(state: ReuseState, keep: torch.Tensor) -> ReuseState:
    J, sig, on = state
    return (None, None, on) if J is None or sig is None else (J[keep], sig[keep], on)


def _kernel_weights(g: _G) -> tuple[Any, ...]:
    """``_memguard_kernel.descend_rows``'s weight arguments (views of g's CPU tensors, W1 a zero-padded copy):
    W [out, in], Wt [in, out] and b of each hidden layer, then the output unit's w [64] and b (a float)."""
    hidden = [[W.numpy(), Wt.numpy(), b.numpy()] for (W, b), Wt in zip(g.layers[:-1], g.transposed, strict=False)]
    W1 = hidden[0][0]  # [256, C] -> [256, C rounded up to 8], zero columns: the features' dot products vectorize
    hidden[0][0] = np.pad(W1, ((0, 0), (0, -W1.shape[1] % 8)))
    (w_out, b_out) = g.layers[-1]
    return (*itertools.chain.from_iterable(hidden), w_out[0].numpy(), float(b_out[0]))


class Buffers:
    """The per-step tensors of a working set of n rows, allocated once per working set."""

    def __init__(self, g: _G, n: int, like: torch.Tensor) -> None:
        C = like.shape[1]
        self.s, self.diff, self.norm = like.new_empty(n, C), like.new_empty(n, C), like.new_empty(n, 1)
        self.acts = [like.new_empty(n, W.shape[0]) for W, _ in g.layers]  # a1, a2, a3, h [n, 1]
        self.grads = [like.new_empty(n, W.shape[1]) for W, _ in reversed(g.layers)]  # dL/d(input of each layer)


@register_defense
class MemGuard:
    name: ClassVar[str] = "memguard"
    randomized: ClassVar[bool] = True
    #: Tens of ms of CPU per batch (gateway/threads.py: ONNX Runtime stops spin-waiting before it).
    long_batches: ClassVar[bool] = True
    #: Responses leave at multiples of this after their batch starts (GATEWAY_TIMING_QUANTUM_MS): a row's
    #: steps, so its time, depend on its confidence vector (docs/ARCHITECTURE.md, "Timing").
    timing_quantum_s: ClassVar[float] = 0.05
    #: Per row the released vector may be anywhere on the simplex; ε bounds the *expected* L1.
    l1_bound = 2.0
    #: On CPU, working sets of at least this many rows keep each row's ∂h/∂s (it depends on g's ReLU
    #: pattern only, as c1·sign(h) = ±1 scales it exactly) and recompute it only where the pattern
    #: changed; below this the pattern bookkeeping costs more than it saves.
    JACOBIAN_REUSE_ROWS: ClassVar[int] = 256
    #: ... and stop for the rest of a round once more than this fraction changed in one step (break-even
    #: measured on CPU: C=30 saves 16% at 40–48% changed; C=100 loses 6% at 63–73%).
    JACOBIAN_REUSE_MAX_CHANGED: ClassVar[float] = 0.6
    #: The compiled loop splits a batch over torch's threads from this many rows per thread.
    ROWS_PER_THREAD: ClassVar[int] = 64

    def __init__(self, g: MemGuardClassifier, params: MemGuardParams, device: torch.device) -> None:
        self.config = params
        self.device = device
        self.dtype = torch.float32 if params.dtype == "float32" else torch.float64
        self.g = _G(g.weights(device, self.dtype), float(g.log_floor))
        self.c3_of = torch.tensor(C3_SCHEDULE, device=device, dtype=self.dtype)  # [R]
        most, later = params.max_iterations - 1, params.later_round_steps
        limits = [most] + [most if later is None else min(most, later)] * (len(C3_SCHEDULE) - 1)
        self.round_steps = torch.tensor(limits, device=device)  # [R] the most steps each round may take
        self._kernel_weights = _kernel_weights(self.g) if device.type == "cpu" else ()
        self.classes = g.classes
        if device.type == "cpu" and params.engine == "compiled":
            self._compile()

    @classmethod
    def from_bundle(cls, bundle: Any, overrides: dict[str, Any], device: torch.device) -> MemGuard:
        entry = bundle.manifest.defenses.get(cls.name)
        if entry is None or not entry.weights:
            raise ValueError(
                "the bundle has no MemGuard classifier; train it with `defense_models train --defense memguard`"
            )
        g = load_weights(MemGuardClassifier(bundle.manifest.output.classes), bundle.path(entry.weights))
        params = MemGuardParams.model_validate({**entry.params, **overrides})
        return cls(g, params, device)

    def params(self) -> dict[str, Any]:
        return self.config.model_dump()

    # --- Phase I -------------------------------------------------------------------------------
    @flush_subnormals()
    def phase_one(self, logits: torch.Tensor, labels: torch.Tensor, side: torch.Tensor | None = None) -> PhaseOne:
        """logits [B, C], labels [B] -> the Phase I noise of every row (no coin, no budget).

        ``side`` [B] bool: with ``landing="boundary"``, which end of the final bracket a row keeps (True: just
        past g's decision; default: just before it)."""
        p = self.config
        B, C = logits.shape
        R = len(C3_SCHEDULE)
        z = logits.to(self.device, self.dtype)
        labels = labels.to(self.device)
        perm = torch.argsort(z, dim=1, stable=True)  # [B, C] ascending
        # Ties at the top: move the label (first index of the maximum) to the last sorted slot.
        last = perm[:, -1].clone()
        pos = (perm == labels[:, None]).to(torch.int64).argmax(dim=1)  # [B] slot holding the label
        rows = torch.arange(B, device=self.device)
        perm[rows, pos] = last
        perm[:, -1] = labels
        zs = z.gather(1, perm)  # [B, C] sorted logits, label last
        ss = torch.softmax(zs, dim=1)  # [B, C] s̃
        h0 = self.g.logit(ss)  # [B]
        skip = (torch.sigmoid(h0.double()) - 0.5).abs() <= NO_NOISE_TOLERANCE  # [B]

        steps = torch.zeros(R, B, dtype=torch.int64, device=self.device)
        success = torch.zeros(R, B, dtype=torch.bool, device=self.device)
        final = zs[None].expand(R, B, C).clone()  # [R, B, C] z̃ + e per round
        idx = (~skip).nonzero()[:, 0]  # [b] rows that need noise
        window, work = self._window(B), 0
        if idx.numel() and window == 1 and self.device.type == "cpu" and p.engine == "compiled":
            work = self._descend_kernel(zs, h0, idx, (final, steps, success))
        elif idx.numel():
            work = self._descend(zs, ss, h0, idx, window, (final, steps, success))
        # The unbroken run of successes from round 0; keep its last round (official rule).
        rounds_ok = success.to(torch.int64).cumprod(dim=0).sum(dim=0)  # [B] 0..R
        has_noise = rounds_ok > 0
        pick = (rounds_ok - 1).clamp_min(0)  # [B]
        chosen = final[pick, torch.arange(B, device=self.device)]  # [B, C] sorted coordinates
        if p.landing == "boundary" and bool(has_noise.any()):
            ids = has_noise.nonzero()[:, 0]
            keep = side.to(self.device)[ids] if side is not None else torch.zeros_like(ids, dtype=torch.bool)
            chosen = chosen.index_copy(0, ids, self._land(zs[ids], chosen[ids], h0[ids], keep))
        chosen = torch.where(has_noise[:, None], chosen, zs)
        noisy = torch.empty_like(chosen).scatter_(1, perm, chosen)  # un-sort: noisy[perm] = chosen
        return PhaseOne(noisy, has_noise, rounds_ok, steps, success, h0, work)

    def _window(self, rows: int) -> int:
        """How many rounds of a row are in flight at once: 7 (side by side) or 1 (one after another)."""
        p = self.config
        R = len(C3_SCHEDULE)
        if p.schedule != "auto":
            return R if p.schedule == "parallel" else 1
        # On CPU every row-step costs time, and most rounds after a row's first failure never need to run:
        # rounds one after another per row do 3-4x less work for the same answer, at ~1.2x the steps.
        return R if self.device.type != "cpu" and rows <= p.parallel_max_rows else 1

    def _descend(
        self,
        zs: torch.Tensor,
        ss: torch.Tensor,
        h0: torch.Tensor,
        rows: torch.Tensor,
        window: int,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> int:
        """Phase I rounds of the batch rows ``rows`` [b], ``window`` rounds of a row in flight at once; returns
        the row-steps taken. zs, ss [B, C], h0 [B]: the batch's sorted logits, s̃ and g's clean logit.

        An entry runs one (row, round). When its round succeeds it restarts from e = 0 at round + window at
        the next step (if that round exists and no earlier round of its row failed), so a row never waits for
        the batch's slowest row; when a round fails, the row's later rounds stop (they cannot matter). Fills
        out = (final [R, B, C], steps [R, B], success [R, B]) per (round, row) that finished.
        """
        R, b = len(C3_SCHEDULE), rows.numel()
        first = torch.arange(window, device=zs.device).repeat_interleave(b)  # [W·b]
        e = _Entries.start(rows.repeat(window), first, zs, ss, h0, self.c3_of, self.round_steps)
        fail_at = torch.full((zs.shape[0],), R, dtype=torch.int64, device=zs.device)  # [B] first failed round
        buf = Buffers(self.g, e.n, zs)
        reuse: ReuseState = (None, None, zs.device.type == "cpu")
        work, tiny, zero = 0, torch.finfo(zs.dtype).tiny, zs.new_zeros(())
        for it in itertools.count():
            s = torch.softmax(e.x, dim=1, out=buf.s)  # [n, C]
            h, acts = self.g.forward(s, buf)  # [n]
            margin = e.x[:, -1] - e.x[:, :-1].amax(dim=1)  # [n] label minus the largest other logit
            # A round always takes its first step, then stops once the label is a strict maximum and h has
            # reached or crossed 0, or after its round's step limit. (At step 0, x = z̃ and h·h0 = h0² > 0: rows
            # with |h0| that small were skipped, so the first step needs no test of its own.) Finished entries
            # awaiting compaction have h_ref = NaN and a deadline that never comes: they never finish again.
            reached = (margin > 0) & (torch.mul(h, e.h_ref) <= zero)  # [n]
            done = reached | e.deadline.eq(it)
            hinged = margin < 0  # [n] rows whose label is not ahead: the c2 term has a gradient
            restart, any_hinged = None, False
            if bool((done | hinged).any()):  # one sync for both (rare) events
                if bool(done.any()):
                    restart = self._finish(e, done, reached, it, window, fail_at, out)
                    if e.n_live == 0:
                        break
                    if e.n_live <= e.n * 7 // 8:  # compact once an eighth finished: copying costs more per row
                        keep = e.live
                        e, s, h, hinged, restart = e.keep(keep), s[keep], h[keep], hinged[keep], restart[keep]
                        acts, reuse = [a[keep] for a in acts], _keep_reuse(reuse, keep)
                        buf = Buffers(self.g, e.n, zs)
                any_hinged = bool(hinged.any())
            work += e.n_live  # steps the rows need; rows awaiting compaction are not counted
            gx, reuse = self._gradient(e.x, s, h, acts, e.s_ref, e.c3w, hinged if any_hinged else None, buf, reuse)
            # Normalized step; a zero gradient (norm clamped to the smallest normal) moves nothing.
            norm = torch.linalg.vector_norm(gx, dim=1, keepdim=True, out=buf.norm).clamp_min_(tiny)  # [n, 1]
            e.x.addcdiv_(gx, norm, value=-self.config.step_size)
            if restart is not None and bool(restart.any()):  # back to e = 0; the first step comes next
                e.x[restart] = zs[e.ids[restart]]
        return work

    def _compile(self) -> None:
        """Compile the loop for this dtype now, on no rows: at startup, not at the first request that needs
        noise (~8 s the first time on the 2-core VM; ~0.5 s from numba's disk cache)."""
        R, C = len(C3_SCHEDULE), self.classes
        out = (torch.zeros(R, 1, C, dtype=self.dtype), torch.zeros(R, 1, dtype=torch.int64),
               torch.zeros(R, 1, dtype=torch.bool))  # fmt: skip
        self._descend_kernel(torch.zeros(1, C, dtype=self.dtype), torch.zeros(1, dtype=self.dtype),
                             torch.zeros(0, dtype=torch.int64), out)  # fmt: skip

    def _descend_kernel(
        self, zs: torch.Tensor, h0: torch.Tensor, rows: torch.Tensor, out: tuple[torch.Tensor, ...]
    ) -> int:
        """``_descend`` with one round of a row in flight, for the batch rows ``rows`` [b], as one compiled loop
        (``_memguard_kernel``): the same steps without PyTorch's per-op cost. CPU only; fills ``out`` in place.

        With more than one torch thread (the offline job; the gateway runs one) a large batch is cut into one
        contiguous part per thread, each part a compiled loop on its own thread (it releases the GIL). A row's
        answer does not depend on its part: its slot runs the same instructions."""
        from gateway.defenses._memguard_kernel import descend_rows

        final, steps, success = (t.numpy() for t in out)  # views: the kernel writes the tensors
        fixed = (*self._kernel_weights, self.g.log_floor, self.round_steps.numpy(), self.c3_of.numpy(),
                 self.config.step_size, C2, final, steps, success)  # fmt: skip

        def run(part: np.ndarray) -> int:
            with flush_subnormals():  # per thread
                return int(descend_rows(zs.numpy(), h0.numpy(), part, *fixed))

        parts = min(torch.get_num_threads(), rows.numel() // self.ROWS_PER_THREAD) or 1
        if parts == 1:
            return run(rows.numpy())
        with ThreadPoolExecutor(parts) as pool:
            return sum(pool.map(run, np.array_split(rows.numpy(), parts)))

    def _finish(
        self,
        e: _Entries,
        done: torch.Tensor,
        reached: torch.Tensor,
        it: int,
        window: int,
        fail_at: torch.Tensor,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Record the entries whose round ended at step ``it`` (done [n]); restart the successful ones at their
        next round and retire the rest, and every entry of a later round than a failed one. -> restart [n]."""
        final, out_steps, out_ok = out
        gone = done.nonzero()[:, 0]
        r_gone, row, ok = e.rnd[gone], e.ids[gone], reached[gone]
        taken = self.round_steps[r_gone] - (e.deadline[gone] - it)  # its limit, less the steps it had left
        final[r_gone, row], out_steps[r_gone, row], out_ok[r_gone, row] = e.x[gone], taken, ok
        fail_at.scatter_reduce_(0, row[~ok], r_gone[~ok], "amin")
        limit = fail_at[e.ids]  # [n]
        nxt = e.rnd + window
        restart = done & reached & (nxt < limit)
        e.retire((done & ~restart) | (e.live & (e.rnd > limit)))
        e.rnd = torch.where(restart, nxt, e.rnd)
        rnd = e.rnd.clamp_max(len(C3_SCHEDULE) - 1)  # retired entries may point past the last round
        e.c3w = self.c3_of[rnd][:, None]
        e.deadline = torch.where(restart, it + 1 + self.round_steps[rnd], e.deadline)
        return restart

    def _gradient(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        h: torch.Tensor,
        acts: list[torch.Tensor],
        s_ref: torch.Tensor,
        c3w: torch.Tensor,
        hinged: torch.Tensor | None,
        buf: Buffers,
        reuse_state: ReuseState,
    ) -> tuple[torch.Tensor, ReuseState]:
        """∇_x L [n, C] at x (s = softmax(x), g's h and activations there; c3w [n, 1]; hinged [n] bool: rows
        whose label is not ahead, None when there are none), and the Jacobian reuse state (J [n, C], the
        patterns it belongs to [n, 20], whether reuse still pays) for the next step."""
        J, sig, reuse = reuse_state
        # dL/ds: c1·sign(h)·∂h/∂s + c3·sign(s − s̃), with c1 = 1
        dh = torch.sign(h)  # [n] ±1 (0 only where h = 0)
        if reuse and x.shape[0] >= self.JACOBIAN_REUSE_ROWS:
            masks = [a.sign_() for a in acts]  # ReLU outputs ≥ 0 -> masks in {0, 1}, in place (acts are done)
            new_sig = signature(masks, self.g.bits)
            rows = None if J is None else changed_rows(new_sig, sig, self.JACOBIAN_REUSE_MAX_CHANGED)
            if J is None or rows is None:
                # Most patterns change at every step: the bookkeeping cannot pay off in this round.
                reuse = J is None
                J = self.g.jacobian(masks)
            elif rows.numel():
                J.index_copy_(0, rows, self.g.jacobian([m.index_select(0, rows) for m in masks]))
            sig, grad_h = new_sig, self.g.chain(J * dh[:, None], s)
        else:
            J = sig = None
            grad_h = self.g.chain(self.g.input_grad(dh, acts, buf), s)
        gs = grad_h.addcmul_(c3w, torch.sub(s, s_ref, out=buf.diff).sign_())  # in place: grad_h is this step's
        gx = torch._softmax_backward_data(gs, s, 1, s.dtype)  # softmax backward, fused: s·(gs − Σ gs·s) [n, C]
        # c2·ReLU(max_{j<C-1} x_j − x_{C-1}): gradient +c2 at the argmax (first maximal index, as max(dim)
        # picks), −c2 at the label; only rows whose label is not ahead have one.
        if hinged is not None:
            rows_h = hinged.nonzero()[:, 0]  # [m]
            arg_other = x[rows_h, :-1].argmax(dim=1)  # [m]
            gx.index_put_((rows_h, arg_other), gx.new_full((rows_h.numel(),), C2), accumulate=True)
            gx[rows_h, -1] -= C2
        return gx, (J, sig, reuse)

    def _land(self, zs: torch.Tensor, crossed: torch.Tensor, h0: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """zs, crossed [n, C] sorted clean and Phase I logits, h0 [n], side [n] bool -> points on the segment
        between them next to g's decision (h = 0) as g reads the released vector, on the side ``side`` picks
        (a row whose end point is not past the decision once re-sorted keeps a point next to that end).

        The label stays a strict maximum on the whole segment: label minus any other logit is linear in t,
        positive at t = 1 (Phase I's success) and non-negative at t = 0."""
        lo = torch.zeros(zs.shape[0], 1, device=zs.device, dtype=zs.dtype)  # [n, 1] h on h0's side
        hi = torch.ones_like(lo)  # [n, 1] h at or past 0
        direction = crossed - zs  # [n, C]
        for _ in range(self.config.landing_steps):
            mid = (lo + hi) / 2
            # g as Phase II and every reader see the released vector: sorted again (the loop never re-sorts)
            h = self.g.logit(torch.sort(torch.softmax(zs + mid * direction, dim=1), dim=1).values)  # [n]
            past = (h * h0 <= 0)[:, None]
            lo, hi = torch.where(past, lo, mid), torch.where(past, mid, hi)
        return zs + torch.where(side[:, None], hi, lo) * direction

    # --- Phase II ------------------------------------------------------------------------------
    def release_probability(self, probs: torch.Tensor, phase: PhaseOne) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (noisy probabilities [B, C] float64, p [B] float64)."""
        noisy = torch.softmax(phase.noisy_logits.double(), dim=1)  # [B, C]
        clean = probs.to(noisy.device, torch.float64)
        g_clean = torch.sigmoid(phase.h0.double())  # g(sorted s)
        g_noisy = torch.sigmoid(self.g.logit(torch.sort(noisy, dim=1).values.to(self.dtype)).double())
        helps = (g_clean - 0.5).abs() > (g_noisy - 0.5).abs()
        d = (noisy - clean).abs().sum(dim=1)  # [B]
        eps = self.config.epsilon
        p = torch.where(helps & phase.has_noise & (d > 0), (eps / d.clamp_min(1e-300)).clamp(max=1.0), 0.0)
        return noisy, p

    @torch.inference_mode()
    @flush_subnormals()
    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        labels = probs.argmax(dim=1)  # [B]
        if self.config.epsilon == 0 or probs.shape[0] == 0:
            return probs
        side = None
        if self.config.landing == "boundary":
            side = row_uniforms(keys, 1, stream=LANDING_STREAM, device=self.device)[:, 0] < 0.5  # [B]
        phase = self.phase_one(logits, labels, side)
        noisy, p = self.release_probability(probs, phase)
        u = torch.from_numpy(uniform_from_digest(keys.cpu().numpy())).to(p.device)  # [B] keyed coin
        release = u < p
        return torch.where(release[:, None], noisy, probs.to(noisy.device, torch.float64))
