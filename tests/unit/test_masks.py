"""Exact ReLU-pattern signatures (gateway/defenses/_masks.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.defenses._masks import bit_weights, changed_rows, signature


@settings(max_examples=50, deadline=None)
@given(
    widths=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_equal_signatures_iff_equal_patterns(widths: list[int], seed: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    bits = [bit_weights(w, torch.device("cpu"), dtype) for w in widths]
    a = [(torch.rand(40, w, generator=g) < 0.5).to(dtype) for w in widths]
    b = [m.clone() for m in a]
    for m in b:  # flip one unit in every third row, anywhere (also bit 23 and the last column)
        cols = torch.randint(0, m.shape[1], (m.shape[0],), generator=g)
        m[::3, :] = m[::3, :].scatter(1, cols[::3, None], 1 - m[::3, :].gather(1, cols[::3, None]))
    expect = torch.stack([(x != y).any(1) for x, y in zip(a, b, strict=True)]).any(0)
    got = (signature(a, bits) != signature(b, bits)).any(1)
    assert torch.equal(got, expect)


def test_changed_rows_falls_back_to_a_full_pass() -> None:
    sig = torch.zeros(8, 2)
    assert changed_rows(sig, None) is None
    moved = sig.clone()
    moved[[1, 5], 0] = 1
    assert changed_rows(moved, sig).tolist() == [1, 5]
    moved[:7, 1] = 1  # 7 of 8 rows changed: more than three quarters
    assert changed_rows(moved, sig) is None
    assert changed_rows(moved, sig, max_fraction=1.0).numel() == 7
