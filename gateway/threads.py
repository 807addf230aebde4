"""Thread placement: how many threads torch and ONNX Runtime use, chosen once at startup and logged.

Measured on the 2-core development VM (docs/BENCHMARKS.md, "Thread placement"): MemGuard's Phase I on
one torch thread is 2.5-5x faster than on two at every batch size from 1 to 480 rows (its steps are small
GEMMs and elementwise passes, where a second thread only adds fork/join waits), and ONNX Runtime's
intra-op threads spin-wait after every run by default, taking the core a long defense (MemGuard) runs on
next. So the defaults: one torch thread, and ORT spinning off before a defense with long batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("gateway.threads")


@dataclass(frozen=True)
class ThreadPlan:
    torch_threads: int
    ort_intra_op_threads: int  # 0: ONNX Runtime's default (one per physical core)
    ort_spinning: bool

    def describe(self) -> str:
        ort = self.ort_intra_op_threads or "default"
        return (
            f"torch {self.torch_threads} thread(s); ONNX Runtime intra-op threads {ort}, spinning "
            f"{'on' if self.ort_spinning else 'off'}"
        )


def plan_threads(
    *, torch_threads: int, ort_intra_op_threads: int, ort_allow_spinning: bool | None, defense: str
) -> ThreadPlan:
    """The settings' values, with 0 / None resolved: torch 1 thread; ORT spinning off only before a defense
    that declares ``long_batches`` (tens of ms of CPU per batch). Shorter defenses gain from spinning: the
    next ORT run follows soon (AEPPT, 9 ms a batch: +15% with spinning, measured in two runs)."""
    if ort_allow_spinning is None:
        from gateway.defenses import REGISTRY  # deferred: imports torch

        ort_allow_spinning = not getattr(REGISTRY.get(defense), "long_batches", False)
    return ThreadPlan(torch_threads or 1, ort_intra_op_threads, ort_allow_spinning)


def apply_torch_threads(plan: ThreadPlan) -> None:
    """Process-wide (every thread, the batch worker included)."""
    import torch

    if torch.get_num_threads() != plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
