"""AEPPT's K updates for one row on CPU as one compiled loop (Numba): ``Aeppt._iterate`` at batch 1.

At batch 1 an update is two small matrix-vector products, so the NumPy loop it replaces spent its time on
per-call overhead (~14 µs an update on the 2-core VM). Here the prediction branch skips the inputs that are
0, the connection layer the units ReLU switched off, and sign(∇_v F) is recomputed only when F's ReLU
masks changed (it depends on them alone), as the batched path does. The label guard and the box are those
of ``Aeppt._iterate``; the tests hold it to the batched path within the contract's 1e-6.

Compiled with numba (``_jit``: import only where the loop runs).
"""

from __future__ import annotations

import numpy as np

from gateway.defenses._jit import Arr
from gateway.defenses._jit import jit as _jit


@_jit
def _lead(v: Arr, label: int) -> float:
    """The label's lead over the largest other entry of v [C] (> 0: a strict maximum)."""
    other = -np.inf
    for j in range(v.shape[0]):
        if j != label and v[j] > other:
            other = v[j]
    return v[label] - other  # type: ignore[no-any-return]


@_jit
def _axpy(a: float, x: Arr, y: Arr) -> None:
    """y += a·x, in place (an array expression would allocate a temporary)."""
    for j in range(y.shape[0]):
        y[j] += a * x[j]


@_jit
def _masks(v: Arr, WpT: Arr, bp: Arr, WcpT: Arr, lp: Arr, pre: Arr, pc: Arr, ma: Arr, mc: Arr) -> bool:
    """F's ReLU masks at v [C], in place: ma [256] (prediction branch), mc [64] (connection layer); pre [256]
    and pc [64] are scratch. WpT [C, 256], WcpT [256, 64]; lp [64] the label branch's part. Returns whether
    either mask changed."""
    pre[:] = bp
    for c in range(v.shape[0]):
        if v[c] != 0.0:
            _axpy(v[c], WpT[c], pre)
    pc[:] = lp
    changed = False
    for j in range(pre.shape[0]):
        on = pre[j] > 0
        changed |= on != ma[j]
        ma[j] = on
        if on:
            _axpy(pre[j], WcpT[j], pc)
    for i in range(pc.shape[0]):
        on = pc[i] > 0
        changed |= on != mc[i]
        mc[i] = on
    return changed


@_jit
def _sign(ma: Arr, mc: Arr, Wo: Arr, Wcp: Arr, Wp: Arr, u: Arr, out: Arr) -> None:
    """sign(∇_v F) [C] from the masks: ((Wo ⊙ mc) @ Wcp ⊙ ma) @ Wp, over the units that are on; u [256] is
    scratch."""
    u[:] = 0.0
    for i in range(mc.shape[0]):
        if mc[i]:
            _axpy(Wo[i], Wcp[i], u)
    out[:] = 0.0
    for j in range(ma.shape[0]):
        if ma[j]:
            _axpy(u[j], Wp[j], out)
    for c in range(out.shape[0]):
        out[c] = 1.0 if out[c] > 0 else (-1.0 if out[c] < 0 else 0.0)


@_jit
def iterate_row(v: Arr, label: int, lp: Arr, WpT: Arr, bp: Arr, WcpT: Arr, Wcp: Arr, Wp: Arr, Wo: Arr,
                lo: Arr, hi: Arr, steps: Arr, shrink: Arr) -> None:  # fmt: skip
    """The K updates of one row, v [C] in place. lo, hi [C]: the box; steps [K] = d·α·r_k; shrink [K]: the
    most the label's lead can lose in step k (2·α·r_k plus a rounding allowance).

    v ← clip(v + steps[k]·sign(∇_v F(v)), lo, hi); a step that would change or tie the argmax is undone and
    the row stops. The exact test runs only once the lead, less the shrink since its last measurement,
    could have reached 0."""
    C, width, hidden = v.shape[0], bp.shape[0], lp.shape[0]
    ma, mc = np.zeros(width, np.bool_), np.zeros(hidden, np.bool_)
    pre, u, pc = np.empty(width, v.dtype), np.empty(width, v.dtype), np.empty(hidden, v.dtype)
    sign, cand = np.zeros(C, v.dtype), np.empty(C, v.dtype)
    lead = _lead(v, label)
    for k in range(steps.shape[0]):
        if _masks(v, WpT, bp, WcpT, lp, pre, pc, ma, mc) or k == 0:
            _sign(ma, mc, Wo, Wcp, Wp, u, sign)
        for c in range(C):
            cand[c] = min(max(v[c] + steps[k] * sign[c], lo[c]), hi[c])
        lead -= shrink[k]
        if lead <= 0:
            lead = _lead(cand, label)
            if lead <= 0:
                return
        v[:] = cand
