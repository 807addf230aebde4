"""Calibration: AEPPT's step size by bisection [docs/ALGORITHMS.md §2, choice]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gateway.defenses.aeppt import Aeppt, AepptParams
from gateway.defenses.classifier import AepptSubstitute
from gateway.pipeline import release_vectors


@dataclass(frozen=True)
class AepptCalibration:
    step_size: float
    balanced_accuracy: float  # the substitute's, on defended outputs
    mean_l1: float
    evaluations: int


def substitute_balanced_accuracy(
    defense: Aeppt, members: torch.Tensor, nonmembers: torch.Tensor
) -> tuple[float, float]:
    """-> (balanced accuracy of F on the defended vectors, mean L1 of the defense)."""
    accs, l1 = [], []
    for probs, target in ((members, 1.0), (nonmembers, 0.0)):
        out = torch.from_numpy(release_vectors(defense, probs.double().numpy(), secret=b"calibration"))
        t = torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(defense.dtype)
        pred = (defense.substitute_logit(out.to(defense.dtype), t) >= 0).double()
        accs.append(float((pred == target).double().mean()))
        l1.append((out - probs.double()).abs().sum(1))
    return 0.5 * sum(accs), float(torch.cat(l1).mean())


def calibrate_aeppt_step(
    substitute: AepptSubstitute,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    *,
    base: AepptParams | None = None,
    target: float = 0.5,
    tolerance: float = 0.01,
    max_evaluations: int = 30,
) -> AepptCalibration:
    """Bisect α until the substitute's balanced accuracy on defended outputs is target ± tolerance.

    The accuracy falls from its undefended value towards (and past) 0.5 as α grows, since every
    row is pushed across F's boundary. Starts from α₀ ≈ L1/(C·K·E[r]) with L1 = 0.1, and doubles
    until the accuracy drops below the target.
    """
    base = base or AepptParams()
    C = members.shape[1]
    device = torch.device("cpu")

    def evaluate(alpha: float) -> tuple[float, float]:
        d = Aeppt(substitute, base.model_copy(update={"step_size": alpha}), device)
        return substitute_balanced_accuracy(d, members, nonmembers)

    lo, hi = 0.0, 0.1 / (C * max(base.iterations, 1) * 0.5 * (base.rand_low + base.rand_high))
    n = 0
    acc, l1 = evaluate(hi)
    n += 1
    while acc > target + tolerance and n < max_evaluations:
        lo, hi = hi, hi * 2
        acc, l1 = evaluate(hi)
        n += 1
    best = (hi, acc, l1)
    while abs(best[1] - target) > tolerance and n < max_evaluations:
        mid = 0.5 * (lo + hi)
        acc, l1 = evaluate(mid)
        n += 1
        if abs(acc - target) < abs(best[1] - target):
            best = (mid, acc, l1)
        if acc > target:
            lo = mid
        else:
            hi = mid
    return AepptCalibration(step_size=best[0], balanced_accuracy=best[1], mean_l1=best[2], evaluations=n)
