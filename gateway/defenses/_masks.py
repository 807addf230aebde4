"""Exact signatures of ReLU activation patterns, to find the rows whose pattern changed.

Both defenses step a batch of rows through a ReLU MLP many times. A row's input gradient depends only
on its activation pattern, which small steps change for a fraction of the rows per step (AEPPT: a
fifth to a third; MemGuard: about half to two thirds). Comparing patterns as bool tensors costs more
than it saves on CPU (bool kernels are slow), so each pattern is packed into a few floats by a GEMM:
24 mask bits per column, exact because integers below 2²⁴ are exact in float32 and float64.
"""

from __future__ import annotations

import torch


def bit_weights(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[n, ⌈n/24⌉]: a {0, 1} mask [N, n] @ this = its bits as exact integers, 24 per column."""
    w = torch.zeros(n, (n + 23) // 24, device=device, dtype=dtype)
    i = torch.arange(n, device=device)
    w[i, i // 24] = (2.0 ** (i % 24)).to(dtype)
    return w


def signature(masks: list[torch.Tensor], bits: list[torch.Tensor]) -> torch.Tensor:
    """Float masks [N, n_i] in {0, 1} -> [N, Σ ⌈n_i/24⌉]; equal rows <=> equal patterns."""
    return torch.cat([m @ b for m, b in zip(masks, bits, strict=True)], dim=1)


def changed_rows(sig: torch.Tensor, prev: torch.Tensor | None, max_fraction: float = 0.75) -> torch.Tensor | None:
    """Indices [n] of the rows whose signature changed; None when all must be recomputed: no previous
    signature, or more than ``max_fraction`` of the rows changed (then one full pass is cheaper than
    gathering the changed rows and scattering their results back)."""
    if prev is None:
        return None
    rows = (sig != prev).any(dim=1)  # [N]
    return None if int(rows.sum()) > sig.shape[0] * max_fraction else rows.nonzero()[:, 0]
