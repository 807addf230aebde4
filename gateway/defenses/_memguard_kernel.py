"""MemGuard's Phase I on CPU as one compiled loop (Numba), for g's fixed shape (C → 256 → 128 → 64 → 1, ReLU).

Why a kernel: a batch-32 step of the PyTorch loop is ~35 small ops around seven small GEMMs, and the ops'
fixed cost (~70 µs a step whatever the row count) was half of its time. Here the loop has no per-op cost
and no working set to compact, and it releases the GIL, so the server's event loop runs while a batch is
defended.

**Slots.** ``BLOCK`` (4) rows are in flight at once, each in its own round and step, and all four go
through g together: each weight is loaded once for four rows (``_gemm``), which doubles the rate of
these matrix-vector products on one core. A slot whose round ends restarts at the row's next round, or takes
the next row of the batch, without waiting for the others (rounds one after another per row, as
``MemGuard._descend`` with ``window == 1``: a row's rounds after its first failure never run). Slots
without a row compute on zeros and are ignored. Every slot goes through the same instructions, so a row's
answer does not depend on its slot, on the other rows, or on the batch size (bit for bit).

The steps are those of the official loop (docs/ALGORITHMS.md §3). Tests: against the serial reference in
float64, the same steps and noise within 1e-8; against the PyTorch loop in float32, the same rounds kept (a
sum rounded another way can move a row's step count, as between the PyTorch loop's own batch shapes).

Compiled with numba (``_jit``: import only where the loop runs).
"""

from __future__ import annotations

import math

import numpy as np

from gateway.defenses._jit import Arr
from gateway.defenses._jit import fast as _fast
from gateway.defenses._jit import jit as _jit

#: Rows in flight at once (the four accumulators of ``_gemm``).
BLOCK = 4


@_fast
def _gemm(X: Arr, W: Arr, out: Arr) -> None:
    """out [4, m] = X [4, k] @ W [m, k]ᵀ, two rows of W at a time: each load of W serves four rows of X and
    each load of X two rows of W (8 sums in registers; ~1.3x one row of W at a time, 2-3x one row of X)."""
    x0, x1, x2, x3 = X[0], X[1], X[2], X[3]
    m = W.shape[0]
    for j in range(0, m, 2):
        w, v = W[j], W[min(j + 1, m - 1)]  # an odd last row pairs with itself
        a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = w[0] - w[0]  # 0 in W's dtype (a literal 0 would sum in float64)
        for k in range(W.shape[1]):
            wk, vk, y0, y1, y2, y3 = w[k], v[k], x0[k], x1[k], x2[k], x3[k]
            a0 += wk * y0
            a1 += wk * y1
            a2 += wk * y2
            a3 += wk * y3
            c0 += vk * y0
            c1 += vk * y1
            c2 += vk * y2
            c3 += vk * y3
        out[0, j], out[1, j], out[2, j], out[3, j] = a0, a1, a2, a3
        if j + 1 < m:
            out[0, j + 1], out[1, j + 1], out[2, j + 1], out[3, j + 1] = c0, c1, c2, c3


@_fast
def _forward(S: Arr, F: Arr, W1: Arr, b1: Arr, W2: Arr, b2: Arr, W3: Arr, b3: Arr, w4: Arr, b4: float,
             log_floor: float, A1: Arr, A2: Arr, A3: Arr, H: Arr) -> None:
    """g on the four slots' probabilities S [4, C]: features F [4, C'] (s, or log(s + floor); columns past C
    stay 0, as W1's padding), hidden
    activations A1 [4, 256], A2 [4, 128], A3 [4, 64] (after ReLU), logits H [4]. W_l [out, in]."""
    for r in range(BLOCK):
        for j in range(S.shape[1]):
            F[r, j] = math.log(S[r, j] + log_floor) if log_floor > 0 else S[r, j]
    for X, W, b, A in ((F, W1, b1, A1), (A1, W2, b2, A2), (A2, W3, b3, A3)):
        _gemm(X, W, A)
        for r in range(BLOCK):
            for j in range(b.shape[0]):
                A[r, j] = max(A[r, j] + b[j], 0.0)
    for r in range(BLOCK):
        h = b4
        for k in range(w4.shape[0]):
            h += A3[r, k] * w4[k]
        H[r] = h


@_fast
def _backward(H: Arr, A1: Arr, A2: Arr, A3: Arr, W1t: Arr, W2t: Arr, W3t: Arr, w4: Arr,
              M1: Arr, M2: Arr, M3: Arr, G1: Arr, G2: Arr, G3: Arr) -> None:
    """∂(sign(h)·h)/∂(first layer's input) G3 [4, C] per slot, through the ReLU masks of A1..A3 (M_l: masked
    gradients, G_l: gradients at each layer's input; W_lt [in, out])."""
    for r in range(BLOCK):
        dh = 1.0 if H[r] > 0 else (-1.0 if H[r] < 0 else 0.0)
        for i in range(w4.shape[0]):
            M3[r, i] = dh * w4[i] if A3[r, i] > 0 else 0.0
    _gemm(M3, W3t, G2)  # [4, 128]
    for A, G, M, Wt, out in ((A2, G2, M2, W2t, G1), (A1, G1, M1, W1t, G3)):
        for r in range(BLOCK):
            for i in range(A.shape[1]):
                M[r, i] = G[r, i] if A[r, i] > 0 else 0.0
        _gemm(M, Wt, out)


@_jit
def _softmax(x: Arr, out: Arr) -> None:
    """out [C] = softmax(x [C]): exp(x − max) / Σ."""
    m = x.max()
    total = 0.0
    for j in range(x.shape[0]):
        out[j] = math.exp(x[j] - m)
        total += out[j]
    for j in range(x.shape[0]):
        out[j] /= total


@_jit
def _margin(x: Arr) -> tuple[float, int]:
    """(label logit minus the largest other one, the first index of that one) for x [C], label last."""
    best = 0
    for j in range(1, x.shape[0] - 1):
        if x[j] > x[best]:
            best = j
    return x[-1] - x[best], best


@_jit
def _step(x: Arr, s: Arr, s_ref: Arr, gs: Arr, c3: float, step: float, c2: float, log_floor: float,
          tiny: float) -> None:
    """One step of the slot at x [C] (s = softmax(x)), given gs [C] = sign(h)·∂h/∂(features): adds the c3
    term, the softmax backward and the c2 hinge, then moves x by −step·∇/‖∇‖ (in place; gs is scratch)."""
    C = x.shape[0]
    dot = 0.0
    for j in range(C):
        if log_floor > 0:
            gs[j] /= s[j] + log_floor
        d = s[j] - s_ref[j]
        gs[j] += c3 * (1.0 if d > 0 else (-1.0 if d < 0 else 0.0))
        dot += gs[j] * s[j]
    for j in range(C):  # softmax backward: s·(gs − Σ gs·s)
        gs[j] = s[j] * (gs[j] - dot)
    margin, other = _margin(x)
    if margin < 0:  # the c2 hinge: +c2 at the largest other logit (first index), −c2 at the label
        gs[other] += c2
        gs[C - 1] -= c2
    norm = 0.0
    for j in range(C):
        norm += gs[j] * gs[j]
    scale = step / max(math.sqrt(norm), tiny)
    for j in range(C):
        x[j] -= gs[j] * scale


@_jit
def _load(q: int, i: int, zs: Arr, row: Arr, rnd: Arr, X: Arr, S_ref: Arr) -> None:
    """Slot q takes batch row i, at round 0 from e = 0."""
    row[q], rnd[q] = i, 0
    X[q] = zs[i]
    _softmax(zs[i], S_ref[q])  # s̃ from the same softmax: at e = 0, s − s̃ is exactly 0


@_jit
def descend_rows(zs: Arr, h_ref: Arr, rows: Arr, W1: Arr, W1t: Arr, b1: Arr, W2: Arr, W2t: Arr, b2: Arr,
                 W3: Arr, W3t: Arr, b3: Arr, w4: Arr, b4: float, log_floor: float, limits: Arr, c3s: Arr,
                 step: float, c2: float, final: Arr, steps: Arr, success: Arr) -> int:  # fmt: skip
    """Phase I of the batch rows ``rows`` [b] (int64); returns the row-steps taken.

    zs [B, C] sorted logits (label last), h_ref [B] g's clean logit; W_l [out, in] and W_lt [in, out] the
    hidden layers' weights (W1 may carry extra zero columns: [256, C'], C' ≥ C), b_l their biases, w4 [64]
    and b4 the output unit; log_floor > 0: the first layer reads log(s + floor); limits [R] the most steps
    per round, c3s [R] its c3, step the step size, c2 the label penalty. Fills final [R, B, C], steps [R, B],
    success [R, B] for the rounds that ran.
    """
    C, dt, tiny = zs.shape[1], zs.dtype, np.finfo(zs.dtype).tiny
    X = np.zeros((BLOCK, C), dt)  # each slot's z̃ + e
    S, S_ref, G3 = np.zeros_like(X), np.zeros_like(X), np.zeros_like(X)
    F = np.zeros((BLOCK, W1.shape[1]), dt)  # features [4, C'], zero-padded as W1's columns
    n1, n2, n3 = b1.shape[0], b2.shape[0], b3.shape[0]
    A1, M1, G1 = np.zeros((BLOCK, n1), dt), np.zeros((BLOCK, n1), dt), np.zeros((BLOCK, n1), dt)
    A2, M2, G2 = np.zeros((BLOCK, n2), dt), np.zeros((BLOCK, n2), dt), np.zeros((BLOCK, n2), dt)
    A3, M3, H = np.zeros((BLOCK, n3), dt), np.zeros((BLOCK, n3), dt), np.zeros(BLOCK, dt)
    row, rnd, t = np.full(BLOCK, -1), np.zeros(BLOCK, np.int64), np.zeros(BLOCK, np.int64)
    queued = busy = min(BLOCK, rows.shape[0])
    for q in range(busy):  # the first rows into the slots
        _load(q, rows[q], zs, row, rnd, X, S_ref)
    work = 0
    while busy:
        for q in range(BLOCK):
            _softmax(X[q], S[q])
        _forward(S, F, W1, b1, W2, b2, W3, b3, w4, b4, log_floor, A1, A2, A3, H)
        moved = False
        for q in range(BLOCK):  # rounds that end here: record, then the next round or the next row
            i = row[q]
            if i < 0:
                continue
            margin, _ = _margin(X[q])
            reached = t[q] > 0 and margin > 0 and H[q] * h_ref[i] <= 0
            if not (reached or t[q] == limits[rnd[q]]):
                continue
            final[rnd[q], i], steps[rnd[q], i], success[rnd[q], i] = X[q], t[q], reached
            if reached and rnd[q] + 1 < c3s.shape[0]:  # the row's next round, from e = 0
                rnd[q] += 1
                X[q] = zs[i]
            elif queued < rows.shape[0]:
                _load(q, rows[queued], zs, row, rnd, X, S_ref)
                queued += 1
            else:
                row[q], busy = -1, busy - 1
                X[q] = 0.0
            t[q], moved = 0, True
        if moved:  # restarted slots need g at their new point; the others get the same values again
            for q in range(BLOCK):
                _softmax(X[q], S[q])
            _forward(S, F, W1, b1, W2, b2, W3, b3, w4, b4, log_floor, A1, A2, A3, H)
        _backward(H, A1, A2, A3, W1t, W2t, W3t, w4, M1, M2, M3, G1, G2, G3)
        for q in range(BLOCK):
            if row[q] >= 0:
                _step(X[q], S[q], S_ref[q], G3[q], c3s[rnd[q]], step, c2, log_floor, tiny)
                t[q] += 1
                work += 1
    return work
