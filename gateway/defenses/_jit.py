"""Numba for the defenses' compiled loops (``_memguard_kernel``, ``_aeppt_kernel``). Import these modules only
where a loop runs: they import numba (~0.3 s).

Each function compiles at its first call per argument types (the defenses compile at construction, so a
server pays it before readiness), cached on disk by numba (``cache=True``: next to the module, else the
user's cache directory: ~8 s without a cache on the 2-core VM, ~0.5 s with one), or in memory where
neither is writable. The loops release the GIL: the event loop runs while a batch is defended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

Arr = np.ndarray[Any, Any]


def jit(f: Callable[..., Any], **flags: Any) -> Any:
    try:
        return numba.njit(cache=True, nogil=True, **flags)(f)
    except RuntimeError:  # numba found no writable cache location: compile in memory
        return numba.njit(nogil=True, **flags)(f)


def fast(f: Callable[..., Any]) -> Any:
    """Sums in any order (vectorized), as a BLAS does: for linear algebra only; tests and signs stay strict
    IEEE in the loops that call it."""
    return jit(f, fastmath=True)
