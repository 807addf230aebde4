"""Plain serial reference implementations, one row at a time with autograd.

Written from the official algorithms (MemGuard ``defense_framework.py``; AEPPT paper §4.4), in the
simplest form that can be checked by eye. The tests compare the batched defenses against them,
and ``bench/defense.py`` times them side by side.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from gateway.defenses.aeppt import AepptParams
from gateway.defenses.classifier import AepptSubstitute, MemGuardClassifier
from gateway.defenses.memguard import C3_SCHEDULE


@dataclass
class RefResult:
    noisy_logits: torch.Tensor  # [C] original coordinates
    has_noise: bool
    steps: list[int]  # per round that ran
    success: list[bool]


def memguard_reference_row(g: MemGuardClassifier, z: torch.Tensor, label: int) -> RefResult:
    """One row, one round at a time, autograd gradients: the official loop in plain torch (float64)."""
    g = copy.deepcopy(g).double()
    C = z.numel()
    order = torch.argsort(z, stable=True)
    slot = int((order == label).nonzero()[0, 0])  # put the label (first max) last
    order[slot], order[-1] = order[-1].clone(), label
    zs = z[order].double()
    ss = torch.softmax(zs, 0)
    with torch.no_grad():
        h0 = g(ss[None])[0]
    if abs(torch.sigmoid(h0).item() - 0.5) <= 1e-5:
        return RefResult(z.double(), False, [], [])
    steps: list[int] = []
    success: list[bool] = []
    last = zs.clone()
    for c3 in C3_SCHEDULE:
        x = zs.clone()
        j, label_ok, crossed, first = 1, False, False, True
        while j < 300 and (first or not (label_ok and crossed)):
            first = False
            x = x.detach().requires_grad_(True)
            s = torch.softmax(x, 0)
            h = g(s[None])[0]
            wrong = x[:-1].max()
            loss = h.abs() + 10.0 * torch.relu(wrong - x[-1]) + c3 * (s - ss).abs().sum()
            (grad,) = torch.autograd.grad(loss, x)
            norm = grad.norm()
            x = (x - 0.1 * grad / (norm if norm > 0 else 1.0)).detach()
            j += 1
            with torch.no_grad():
                h_new = g(torch.softmax(x, 0)[None])[0]
            label_ok = bool(x[-1] > x[:-1].max())
            crossed = bool(h_new * h0 <= 0)
        steps.append(j - 1)
        success.append(label_ok and crossed)
        if not success[-1]:
            break
        last = x
    noisy = torch.empty(C, dtype=torch.float64)
    noisy[order] = last
    return RefResult(noisy, success[0], steps, success)


def aeppt_reference_row(sub: AepptSubstitute, y: torch.Tensor, r: torch.Tensor, params: AepptParams) -> torch.Tensor:
    """One row of AEPPT (float64): y [C] probabilities, r [K] step multipliers -> released [C]."""
    sub = copy.deepcopy(sub).double()
    C = y.numel()
    label = int(y.argmax())
    t = torch.nn.functional.one_hot(torch.tensor(label), C).double()[None]
    with torch.no_grad():
        member = bool(sub(y[None], t)[0] >= 0)
    d = -1.0 if member else 1.0
    eps = float("inf") if params.clip_eps is None else params.clip_eps
    lo, hi = (y - eps).clamp_min(0.0), (y + eps).clamp_max(1.0)
    v = y.clone()
    for k in range(params.iterations):
        x = v.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(sub(x[None], t)[0], x)
        cand = torch.minimum(torch.maximum(v + d * params.step_size * r[k] * torch.sign(grad), lo), hi)
        if not bool(cand[label] > torch.cat([cand[:label], cand[label + 1 :]]).max()):
            break  # the step would change or tie the label: undo it and freeze the row
        v = cand
    return v / v.sum() if bool((v != y).any()) else y
