"""Label-only attacks (Choquette-Choo et al., ICML 2021): they query the endpoint and use labels only,
so no label-preserving output defense changes what they see.

``NoiseRobustnessAttack`` (binary/tabular features): a record's score is the share of ``copies``
perturbed versions, each feature flipped with probability q, that the endpoint still labels with the
record's class; members sit deeper inside their class region. q is chosen on the attacker's shadow
model from a small grid [choice: the paper tunes q and τ on a shadow; N = 100 in the paper].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from defense_models.scoring import best_threshold

#: predict(X [N, D]) -> probabilities [N, C] (any Predictor's .predict)
PredictFn = Callable[[np.ndarray], np.ndarray]


class NoiseRobustnessAttack:
    name: ClassVar[str] = "noise_robustness"

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
            y_out: np.ndarray) -> None:  # fmt: skip
        """Pick the flip rate that separates the shadow model's members from its non-members best."""
        best = (-1.0, self.flips[0])
        for flip in self.flips:
            s_in = self._robustness(shadow_predict, X_in, y_in, flip)
            s_out = self._robustness(shadow_predict, X_out, y_out, flip)
            bacc = best_threshold(s_in, s_out)[1]
            if bacc > best[0]:
                best = (bacc, flip)
        self.flip = best[1]

    def score(self, predict: PredictFn, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.flip is None:
            raise RuntimeError("fit the attack first")
        return self._robustness(predict, X, y, self.flip)
