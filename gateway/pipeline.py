"""One batch through model and defense, with the fail-closed guard. No HTTP here.

``Pipeline.__call__`` is blocking (it runs on the batch worker thread): runner → clean softmax
→ defense → per-row invariants → released vectors. A row whose defended vector breaks an
invariant (or whose defense raised) is never released raw: it becomes the one-hot label vector
(``label_only``) or is flagged for rejection (``reject``: its request gets a 503).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gateway.defenses.base import Defense, ModelBound, Predict, keyed_on_input
from gateway.defenses.keyed import DIGEST_BYTES, OUTPUT_KEY_GRID, RowKeyer, output_key_rows
from gateway.defenses.simplex import logits_from_probs, one_hot, row_violations
from gateway.metrics import GatewayMetrics
from gateway.runner import ModelRunner

log = logging.getLogger("gateway.pipeline")


@dataclass(frozen=True)
class BatchOutput:
    probabilities: np.ndarray  # [B, C] float64, defended (or the one-hot fallback)
    labels: np.ndarray  # [B] int64, argmax of the undefended vector
    rejected: np.ndarray  # [B] bool: rows that must not be answered (their request gets 503, or 422 below)
    #: [B] bool: rows whose (finite, validated) input gave a non-finite model output: out of the model's range,
    #: a client-side problem (422), not a defense fallback.
    out_of_range: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Defended:
    released: torch.Tensor  # [B, C] float64; changed rows renormalised, unchanged rows the clean vector
    bad: torch.Tensor  # [B] bool: rows that broke an invariant (or the defense raised): never release them
    label_changed: torch.Tensor  # [B] bool: rows where the defense tried to move the label


def defend_batch(
    defense: Defense, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor
) -> Defended:
    """What the gateway releases for these undefended outputs, with the per-row invariants checked.

    probs [B, C] float64, logits [B, C] float32, keys [B, 32] uint8, labels [B] (argmax of probs).
    The one code path from outputs to released vectors: the serving pipeline calls it per batch, and
    the offline job (calibration, quality gates, the audit's attacker copy) through ``release_vectors``.
    A defense that raises fails every row of the batch closed; nothing raw is marked releasable.
    """
    B = probs.shape[0]
    try:
        released = defense.defend(probs, logits, keys)
        if tuple(released.shape) != tuple(probs.shape):
            raise RuntimeError(f"defense returned shape {tuple(released.shape)}, expected {tuple(probs.shape)}")
        released = released.to(probs.device, torch.float64)
        bad = row_violations(released, probs, labels, defense.l1_bound)  # [B]
        label_changed = released.argmax(dim=1) != labels  # [B]
    except Exception as exc:  # fail closed: no row of this batch is released from the defense
        log.error("defense %r failed on a batch of %d rows: %s", defense.name, B, type(exc).__name__)
        released = probs.clone()
        bad = torch.ones(B, dtype=torch.bool, device=probs.device)
        label_changed = torch.zeros(B, dtype=torch.bool, device=probs.device)
    # Renormalise changed rows in float64 (order-preserving) so they sum to 1 within ~1e-15;
    # rows the defense left alone stay bit-identical to the clean vector.
    changed = (released != probs).any(dim=1, keepdim=True)  # [B, 1]
    released = torch.where(changed, released / released.sum(dim=1, keepdim=True).clamp_min(1e-300), probs)
    return Defended(released, bad, label_changed)


def release_vectors(
    defense: Defense, probs: np.ndarray, *, secret: bytes, context: bytes = b"offline",
    model: tuple[Predict, int] | None = None, grid: float = OUTPUT_KEY_GRID,
) -> np.ndarray:  # fmt: skip
    """Offline: probs [N, C] (clean softmax) -> what the gateway would release [N, C] float64.

    Keys come from the rows' quantized outputs under ``secret``, as the gateway's default output keys (an
    attacker's copy uses its own secret); an input-keyed defense's also from each row's position. ``model``
    (predict, features) is bound to a ``ModelBound`` defense first. Rows that break an invariant get the
    label-only vector, as with ``GATEWAY_ON_DEFENSE_ERROR=label_only``.
    """
    if model is not None and isinstance(defense, ModelBound):
        defense.bind_model(*model)
    p = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float64))  # [N, C]
    rows = output_key_rows(p.numpy(), grid)  # [N, C]
    if keyed_on_input(defense):  # no inputs here: the row's position makes every row's draw its own
        rows = np.column_stack([np.arange(len(rows), dtype="<f4"), rows])  # [N, 1 + C]
    keys = torch.from_numpy(RowKeyer(secret, context).digests(rows))  # [N, 32]
    labels = p.argmax(dim=1)
    out = defend_batch(defense, p, logits_from_probs(p).float(), keys, labels)
    return torch.where(out.bad[:, None], one_hot(labels, p.shape[1]), out.released).numpy()


class Pipeline:
    def __init__(
        self,
        runner: ModelRunner,
        defense: Defense,
        *,
        classes: int,
        output_kind: Literal["logits", "probabilities"],
        on_defense_error: Literal["reject", "label_only"],
        metrics: GatewayMetrics,
        keyer: RowKeyer | None,
        device: torch.device,
        features: int = 0,
        noise_key: Literal["output", "input"] = "output",
        noise_key_grid: float = OUTPUT_KEY_GRID,
    ) -> None:
        if defense.randomized and keyer is None:
            raise ValueError(f"defense {defense.name!r} is randomized and needs a RowKeyer")
        if isinstance(defense, ModelBound):
            if features < 1:
                raise ValueError(f"defense {defense.name!r} runs the model and needs the input width")
            defense.bind_model(self._reference_probs, features)
        self.runner = runner
        self.defense = defense
        self.classes = classes
        self.output_kind = output_kind
        self.on_defense_error = on_defense_error
        self.metrics = metrics
        self.keyer = keyer
        self.device = device
        # GATEWAY_NOISE_KEY, unless the defense must key on the input (the startup log reads this one)
        self.noise_key: Literal["output", "input"] = "input" if keyed_on_input(defense) else noise_key
        self.noise_key_grid = noise_key_grid

    def __call__(self, x: np.ndarray) -> BatchOutput:
        """x[B, D] float32, already validated -> BatchOutput."""
        t0 = time.perf_counter()
        raw = self.runner.run(x)  # [B, C]
        self.metrics.model_inference.observe(time.perf_counter() - t0)
        probs, logits, model_ok = self._clean(raw, x.shape[0])
        labels = probs.argmax(dim=1)  # [B], first index on ties
        keys = self._keys(x, probs)  # [B, 32] uint8
        t1 = time.perf_counter()
        defended = defend_batch(self.defense, probs, logits, keys, labels)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.metrics.defense_seconds.labels(self.defense.name).observe(time.perf_counter() - t1)
        bad = defended.bad | ~model_ok  # [B]
        released = torch.where(bad[:, None], one_hot(labels, self.classes), defended.released)  # [B, C]
        rejected = (bad & (self.on_defense_error == "reject")) | ~model_ok  # [B]
        out = BatchOutput(probabilities=released.cpu().numpy(), labels=labels.cpu().numpy(),
                          rejected=rejected.cpu().numpy(), out_of_range=(~model_ok).cpu().numpy())  # fmt: skip
        l1 = (released - probs).abs().sum(dim=1).cpu().numpy()  # [B]
        self._record(out, (defended.bad & model_ok).cpu().numpy(), l1, int((defended.label_changed & model_ok).sum()))
        return out

    def _keys(self, x: np.ndarray, probs: torch.Tensor) -> torch.Tensor:
        """x [B, D], clean probs [B, C] -> digests [B, 32] uint8 of the quantized output (or of the input)."""
        if self.keyer is None or not self.defense.randomized:
            return torch.empty((x.shape[0], DIGEST_BYTES), dtype=torch.uint8)
        rows = output_key_rows(probs.cpu().numpy(), self.noise_key_grid) if self.noise_key == "output" else x
        return torch.from_numpy(self.keyer.digests(rows))

    def _reference_probs(self, x: np.ndarray) -> np.ndarray:
        """For a ``ModelBound`` defense: x [B, D] -> clean probabilities [B, C] float64 (non-finite rows: NaN, so
        the rows they feed fail their invariants and are never released)."""
        probs, _, ok = self._clean(self.runner.run(np.ascontiguousarray(x, dtype=np.float32)), x.shape[0])
        return torch.where(ok[:, None], probs, torch.full_like(probs, float("nan"))).cpu().numpy()

    def _clean(self, raw: np.ndarray, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's outputs [B, C] -> (clean probs [B, C] float64, logits [B, C] float32, finite rows [B]).
        Non-finite rows are zeroed here and never released (they are rejected)."""
        C = self.classes
        if raw.shape != (B, C):
            raise RuntimeError(f"model returned shape {tuple(raw.shape)}, expected ({B}, {C}); check the bundle")
        out = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).to(self.device)  # [B, C]
        model_ok = torch.isfinite(out).all(dim=1)  # [B]
        out = torch.where(model_ok[:, None], out, torch.zeros_like(out))
        if self.output_kind == "logits":
            return torch.softmax(out.double(), dim=1), out, model_ok
        p = out.double().clamp_min(0)
        probs = p / p.sum(dim=1, keepdim=True).clamp_min(1e-300)  # [B, C]
        return probs, logits_from_probs(probs).float(), model_ok

    def _record(self, out: BatchOutput, bad: np.ndarray, l1: np.ndarray, label_changes: int) -> None:
        """Outcome counters, label changes and the L1 histogram for one batch (rejected rows: no L1). ``bad``:
        the defense's fallbacks; rows out of the model's range count as ``out_of_range``, not as fallbacks."""
        name, B = self.defense.name, len(bad)
        n_bad, n_oor = int(bad.sum()), int(out.out_of_range.sum())
        n_perturbed = int(((l1 > 0) & ~bad & ~out.out_of_range).sum())
        self.metrics.defended_rows.labels(name, "fallback").inc(n_bad)
        self.metrics.defended_rows.labels(name, "out_of_range").inc(n_oor)
        self.metrics.defended_rows.labels(name, "perturbed").inc(n_perturbed)
        self.metrics.defended_rows.labels(name, "unchanged").inc(B - n_bad - n_oor - n_perturbed)
        if label_changes:
            self.metrics.label_changes.labels(name).inc(label_changes)
        hist = self.metrics.l1_distortion.labels(name)
        for value in l1[~out.rejected]:
            hist.observe(float(value))
        if n_bad:
            log.warning("defense %r: %d of %d rows fell back (%s)", name, n_bad, B, self.on_defense_error)
