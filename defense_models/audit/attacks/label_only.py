"""Label-only attacks (Choquette-Choo et al., ICML 2021): they query the endpoint and use labels only,
so no label-preserving output defense changes what they see.

``NoiseRobustnessAttack`` (binary/tabular features): a record's score is the share of ``copies``
perturbed versions, each feature flipped with probability q, that the endpoint still labels with the
record's class; members sit deeper inside their class region. q is chosen on the attacker's shadow
model from a small grid [choice: the paper tunes q and τ on a shadow; N = 100 in the paper].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from defense_models.audit.scoring import best_threshold
from gateway.registry import Registry

#: predict(X [N, D]) -> probabilities [N, C] (any Predictor's .predict)
PredictFn = Callable[[np.ndarray], np.ndarray]

#: The audit's ``--label-only`` attacks. Each class builds itself from the audit's config and dataset with
#: ``for_audit`` (None where it does not apply), has ``fit``/``score`` as below, a ``queries`` counter,
#: and ``record()`` for what it adds to the report.
LABEL_ONLY_ATTACKS = Registry("label-only attack", ())


@LABEL_ONLY_ATTACKS.register
class NoiseRobustnessAttack:
    name: ClassVar[str] = "noise_robustness"

    @classmethod
    def for_audit(cls, config: Any, data: Any) -> NoiseRobustnessAttack | None:
        """None unless every feature is binary (it flips features)."""
        return cls(copies=config.label_only_copies, seed=config.seed) if data.binary else None

    def record(self) -> dict[str, Any]:
        return {"flip_rate": self.flip}

    def __init__(self, copies: int = 100, flips: Sequence[float] = (0.005, 0.01, 0.02, 0.05), seed: int = 0) -> None:
        self.copies = copies
        self.flips = tuple(flips)
        self.seed = seed
        self.flip: float | None = None
        self.queries = 0

    def _robustness(self, predict: PredictFn, X: np.ndarray, y: np.ndarray, flip: float) -> np.ndarray:
        """[N] share of perturbed copies labelled y."""
        rng = np.random.default_rng(self.seed)
        n = X.shape[0]
        copies = np.repeat(X, self.copies, axis=0)  # [N·copies, D]
        mask = rng.random(copies.shape) < flip
        copies = np.where(mask, 1.0 - copies, copies).astype(np.float32)
        labels = predict(copies).argmax(axis=1).reshape(n, self.copies)  # [N, copies]
        self.queries += len(copies)
        return (labels == y[:, None]).mean(axis=1)

    def fit(self, shadow_predict: PredictFn, X_in: np.ndarray, y_in: np.ndarray, X_out: np.ndarray,
            y_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Pick the flip rate that separates the shadow model's members from its non-members best;
        return the shadow scores at that rate (for the audit's threshold)."""
        best: tuple[float, float, tuple[np.ndarray, np.ndarray]] | None = None
        for flip in self.flips:
            s_in = self._robustness(shadow_predict, X_in, y_in, flip)
            s_out = self._robustness(shadow_predict, X_out, y_out, flip)
            bacc = best_threshold(s_in, s_out)[1]
            if best is None or bacc > best[0]:
                best = (bacc, flip, (s_in, s_out))
        assert best is not None, "flips must not be empty"
        self.flip = best[1]
        return best[2]

    def score(self, predict: PredictFn, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.flip is None:
            raise RuntimeError("fit the attack first")
        return self._robustness(predict, X, y, self.flip)


@LABEL_ONLY_ATTACKS.register
class BoundaryDistanceAttack:
    """HopSkipJump (Chen et al., S&P 2020), untargeted L2, as Choquette-Choo et al. use it: a record's
    score is the L2 distance from it to the nearest point the endpoint labels differently, found with
    label queries only. Members sit farther from the boundary. Batched over rows; every row gets the
    same fixed schedule, so no row ever spends more than ``max_queries`` queries:

    * start: ``init_tries`` uniform points in the feature box; the first one labelled ≠ y;
    * binary search (``search_steps`` queries) along the segment to the boundary;
    * then iterations of: gradient-direction estimate at the boundary point from ``grad_queries``
      random probes (HSJA's baseline-corrected sign average), a geometric step search of at most
      ``step_tries`` queries, and a fresh binary search back to the boundary.

    [choices: HSJA's δ = ‖x_b − x‖/D and step ‖x_b − x‖/√t; features live in [lo, hi] (binary
    features in [0, 1]); a row with no start point (every try kept y) gets the largest distance seen.]
    """

    name: ClassVar[str] = "boundary_distance"

    @classmethod
    def for_audit(cls, config: Any, data: Any) -> BoundaryDistanceAttack:
        lo, hi = float(data.X.min()), float(data.X.max())  # the feature box
        return cls(max_queries=config.label_only_queries, lo=lo, hi=hi, seed=config.seed)

    def record(self) -> dict[str, Any]:
        return {"max_queries_per_row": self.max_queries}

    def __init__(self, max_queries: int = 200, init_tries: int = 10, search_steps: int = 10, grad_queries: int = 20,
                 step_tries: int = 4, lo: float = 0.0, hi: float = 1.0, seed: int = 0) -> None:  # fmt: skip
        per_iteration = grad_queries + step_tries + search_steps
        self.iterations = (max_queries - init_tries - search_steps) // per_iteration
        if self.iterations < 0:
            raise ValueError(f"max_queries={max_queries} does not cover the start ({init_tries + search_steps})")
        self.max_queries = max_queries
        self.init_tries, self.search_steps, self.grad_queries, self.step_tries = (
            init_tries, search_steps, grad_queries, step_tries)  # fmt: skip
        self.lo, self.hi, self.seed = lo, hi, seed
        self.threshold: float | None = None
        self.queries = 0

    def _labels(self, predict: PredictFn, X: np.ndarray) -> np.ndarray:
        self.queries += len(X)
        return predict(np.ascontiguousarray(X, dtype=np.float32)).argmax(axis=1)

    def _to_boundary(self, predict: PredictFn, x: np.ndarray, adv: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Binary search on each segment x → adv (adv labelled ≠ y): the adversarial end after the search."""
        low, high = np.zeros(len(x)), np.ones(len(x))  # [N] blend weights of adv
        for _ in range(self.search_steps):
            mid = (low + high) / 2
            flipped = self._labels(predict, x + mid[:, None] * (adv - x)) != y
            high, low = np.where(flipped, mid, high), np.where(flipped, low, mid)
        return x + high[:, None] * (adv - x)

    def distances(self, predict: PredictFn, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """[N] L2 distance to the decision boundary, within the query budget."""
        rng = np.random.default_rng(self.seed)
        n, d = X.shape
        x = X.astype(np.float64)
        adv = x.copy()
        found = np.zeros(n, dtype=bool)
        for _ in range(self.init_tries):  # a start point labelled ≠ y; one query per row per try
            cand = rng.uniform(self.lo, self.hi, size=(n, d))
            hit = (self._labels(predict, cand) != y) & ~found
            adv[hit], found = cand[hit], found | hit
        if not found.any():
            return np.full(n, np.sqrt(d) * (self.hi - self.lo))
        boundary = self._to_boundary(predict, x, adv, y)  # [N, D]
        for t in range(1, self.iterations + 1):
            dist = np.linalg.norm(boundary - x, axis=1)  # [N]
            delta = dist / d
            u = rng.standard_normal((n, self.grad_queries, d))
            u /= np.linalg.norm(u, axis=2, keepdims=True)  # [N, B, D] unit probes
            probes = np.clip(boundary[:, None, :] + delta[:, None, None] * u, self.lo, self.hi)
            sign = np.where(self._labels(predict, probes.reshape(-1, d)).reshape(n, -1) != y[:, None], 1.0, -1.0)
            centred = sign - sign.mean(axis=1, keepdims=True)
            weights = np.where(np.abs(sign.mean(axis=1, keepdims=True)) == 1.0, sign, centred)  # [N, B]
            grad = np.einsum("nb,nbd->nd", weights, u)
            grad /= np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)
            step = dist / np.sqrt(t)
            moved = boundary.copy()
            pending = np.ones(n, dtype=bool)
            for _ in range(self.step_tries):  # geometric step search: halve until still ≠ y
                cand = np.clip(boundary + step[:, None] * grad, self.lo, self.hi)
                ok = (self._labels(predict, cand) != y) & pending
                moved[ok], pending = cand[ok], pending & ~ok
                step = step / 2
            boundary = self._to_boundary(predict, x, moved, y)
        dist = np.linalg.norm(boundary - x, axis=1)
        return np.where(found, dist, dist[found].max())

    def fit(self, shadow_predict: PredictFn, X_in: np.ndarray, y_in: np.ndarray, X_out: np.ndarray,
            y_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Distances on the shadow model's members and non-members (for the audit's threshold)."""
        s_in, s_out = self.distances(shadow_predict, X_in, y_in), self.distances(shadow_predict, X_out, y_out)
        self.threshold = best_threshold(s_in, s_out)[0]
        return s_in, s_out

    def score(self, predict: PredictFn, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.distances(predict, X, y)
