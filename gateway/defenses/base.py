"""The defense interface.

A defense maps a batch of undefended vectors to released vectors::

    defend(probs[B, C], logits[B, C], keys[B, 32]) -> released[B, C]

* ``probs``: the clean softmax, float64, on ``device``; ``logits``: float32 on ``device`` (for a
  probability-only backend, ``log(max(p, 1e-30))``, which has the same softmax).
* ``keys``: per-row HMAC-SHA256 digests (uint8, CPU) — the *only* source of randomness a
  defense may use, so the same row gets the same answer on every call and replica.
* The result must, for every row, be finite, non-negative, sum to 1 (±1e-4 before the pipeline's
  float64 renormalisation), keep ``argmax(probs)`` (first index on ties) and stay within
  ``l1_bound`` of ``probs``. The pipeline checks all of this per row and never releases a row that
  fails: it gets the configured fallback instead.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

#: X [B, D] float32 -> the model's clean probabilities [B, C] float64.
Predict = Callable[[np.ndarray], np.ndarray]

_subnormals = threading.local()


@contextlib.contextmanager
def flush_subnormals() -> Iterator[None]:
    """Subnormal floats read and written as 0 on this thread (x86 FTZ/DAZ) inside, the default after; nests.

    Weight decay leaves the defenders' classifiers with subnormal weights on dead units (4,508 in one
    Location30 g's second layer), and on x86 every operation on a subnormal takes a microcode assist:
    MemGuard's PyTorch loop ran 7.4x slower on that bundle (1,178 vs 159 ms for 64 rows), the compiled loop
    4x on the demo bundle. Values under 1e-38 change nothing sums of terms ~1e-3 and up can hold."""
    depth = getattr(_subnormals, "depth", 0)
    if depth == 0:
        torch.set_flush_denormal(True)
    _subnormals.depth = depth + 1
    try:
        yield
    finally:
        _subnormals.depth = depth
        if depth == 0:
            torch.set_flush_denormal(False)


@runtime_checkable
class Defense(Protocol):
    #: Registry name; also the ``defense`` label of the metrics and the response.
    name: ClassVar[str]
    #: Whether ``defend`` consumes ``keys`` (the pipeline only computes digests when needed).
    randomized: ClassVar[bool]

    @property
    def l1_bound(self) -> float:
        """Largest per-row L1 distance ``defend`` may introduce (2.0 means unbounded on the simplex)."""
        ...

    def params(self) -> dict[str, Any]:
        """Effective parameters, JSON-serialisable; logged at startup and bound into the row keys."""
        ...

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor: ...

    @classmethod
    def from_bundle(cls, bundle: Any, overrides: dict[str, Any], device: torch.device) -> Defense:
        """Build from an artifact bundle: weights and calibrated parameters from its manifest entry,
        ``overrides`` (GATEWAY_DEFENSE_PARAMS__*) on top; raise ``ValueError`` naming the fix."""
        ...


def keyed_on_input(defense: Defense) -> bool:
    """Whether ``defense`` draws its randomness from the input row's key whatever ``GATEWAY_NOISE_KEY`` says
    (class attribute ``input_keyed``). A defense whose released values must carry nothing of the clean output
    needs it: under the output key, rows whose outputs share a grid cell share a draw, and every saturated
    member of a class shares one cell, so the release would mark them."""
    return bool(getattr(defense, "input_keyed", False))


@runtime_checkable
class ModelBound(Protocol):
    """A defense that runs the served model itself (on inputs it draws from the row keys).

    Whoever serves it binds the model before the first ``defend``: the gateway's pipeline its runner, the
    offline job the target, the audit's attacker copy its own shadow model. Unbound, ``defend`` raises,
    so the pipeline fails the batch closed.
    """

    def bind_model(self, predict: Predict, features: int) -> None: ...
