"""Where the attacker's shadow training data comes from (Shokri et al. 2017, §V-C), one registry.

Every source returns records for the attacker's shadow model to train on (``X_in, y_in``) and records
it keeps out (``X_out, y_out``), so every shadow-trained attack in the audit can use any source:

* ``real``: the shadow split itself (records from the same distribution as the target's).
* ``noisy``: the same records with ``flip`` (default 10%) of their binary features flipped, exactly
  round(flip·D) features per record, chosen at random.
* ``marginal``: each feature drawn independently from its marginal in the attacker's records; the
  endpoint labels the synthetic records (one query each).
* ``model``: Shokri et al.'s Algorithm 1: hill-climbing queries against the endpoint find records it
  classifies as class c with high confidence; a query budget bounds the search, and every query is
  counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.registry import Registry

#: predict(X [N, D]) -> probabilities [N, C] (the endpoint, or any Predictor's .predict)
PredictFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class AttackerRecords:
    X_in: np.ndarray  # [N_in, D] float32
    y_in: np.ndarray  # [N_in] int64
    X_out: np.ndarray
    y_out: np.ndarray
    queries: int = 0  # queries spent on the endpoint to make them

    def summary(self, source: str) -> dict[str, Any]:
        return {"source": source, "records_in": len(self.y_in), "records_out": len(self.y_out),
                "queries_to_target": self.queries}  # fmt: skip


class _Counted:
    """The endpoint with a query counter and a hard budget."""

    def __init__(self, predict: PredictFn, budget: int | None) -> None:
        self._predict, self.budget, self.spent = predict, budget, 0

    def left(self) -> int:
        return np.iinfo(np.int64).max if self.budget is None else self.budget - self.spent

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if len(X) > self.left():
            raise RuntimeError(f"query budget exceeded ({self.spent} + {len(X)} > {self.budget})")
        self.spent += len(X)
        return self._predict(np.ascontiguousarray(X, dtype=np.float32))


SOURCES = Registry("attacker data")
register = SOURCES.function


def attacker_records(source: str, shadow_in: tuple[np.ndarray, np.ndarray], shadow_out: tuple[np.ndarray, np.ndarray],
                     predict: PredictFn, *, seed: int = 0, **params: Any) -> AttackerRecords:  # fmt: skip
    """``shadow_in``/``shadow_out``: the real records the attacker holds (X, y); ``predict``: the endpoint."""
    fn = SOURCES.get(source)
    return fn(shadow_in, shadow_out, predict, np.random.default_rng(seed), **params)


@register("real")
def _real(shadow_in: Any, shadow_out: Any, predict: PredictFn, rng: np.random.Generator) -> AttackerRecords:
    return AttackerRecords(*shadow_in, *shadow_out)


def flip_features(X: np.ndarray, flip: float, rng: np.random.Generator) -> np.ndarray:
    """Flip exactly round(flip·D) randomly chosen binary features of every row."""
    if not np.isin(X, (0.0, 1.0)).all():
        raise ValueError("noisy attacker data flips binary features; this dataset is not binary")
    n, d = X.shape
    k = round(flip * d)
    chosen = np.argsort(rng.random((n, d)), axis=1)[:, :k]  # [N, k] distinct columns per row
    out = X.copy()
    rows = np.arange(n)[:, None]
    out[rows, chosen] = 1.0 - out[rows, chosen]
    return out


@register("noisy")
def _noisy(shadow_in: Any, shadow_out: Any, predict: PredictFn, rng: np.random.Generator,
           flip: float = 0.1) -> AttackerRecords:  # fmt: skip
    return AttackerRecords(flip_features(shadow_in[0], flip, rng), shadow_in[1],
                           flip_features(shadow_out[0], flip, rng), shadow_out[1])  # fmt: skip


def sample_marginals(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, D]: every feature drawn independently from its empirical marginal in ``pool`` [M, D]."""
    picks = rng.integers(0, len(pool), size=(n, pool.shape[1]))  # a row index per cell
    return pool[picks, np.arange(pool.shape[1])[None, :]].astype(np.float32)


@register("marginal")
def _marginal(shadow_in: Any, shadow_out: Any, predict: PredictFn, rng: np.random.Generator,
              max_queries: int | None = None) -> AttackerRecords:  # fmt: skip
    endpoint = _Counted(predict, max_queries)
    pool = np.concatenate([shadow_in[0], shadow_out[0]])
    n_in, n_out = len(shadow_in[1]), len(shadow_out[1])
    X = sample_marginals(pool, n_in + n_out, rng)
    y = endpoint(X).argmax(axis=1)
    return AttackerRecords(X[:n_in], y[:n_in], X[n_in:], y[n_in:], endpoint.spent)


def hill_climb(predict: PredictFn, pool: np.ndarray, classes: int, per_class: int, rng: np.random.Generator, *,
               max_queries: int, k_max: int | None = None, k_min: int = 1, conf_min: float = 0.2, rej_max: int = 10,
               iter_max: int = 200, parallel: int = 8) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """Shokri et al.'s Algorithm 1, ``parallel`` climbers per class at once, until every class has
    ``per_class`` records, the budget is spent, or every climber ran ``iter_max`` iterations.

    A climber keeps its best record x*; each iteration resamples k features of x* from their marginals
    and queries it. A candidate at least as confident as x* on class c becomes x*; if it is also above
    ``conf_min`` and labelled c, it is kept with probability y_c (then the climber restarts from a
    random record). After ``rej_max`` rejections in a row, k halves (not below k_min).
    [choices: k_max = D/4, random records drawn from the marginals of the attacker's pool.]
    Returns (X [M, D], y [M], queries spent).
    """
    endpoint = _Counted(predict, max_queries)
    d = pool.shape[1]
    k_max = k_max or max(1, d // 4)
    m = classes * parallel
    target = np.repeat(np.arange(classes), parallel)  # [M] class each climber searches for
    x = sample_marginals(pool, m, rng)  # current candidates [M, D]
    best, best_conf = x.copy(), np.zeros(m)
    k, rejections, steps = np.full(m, k_max), np.zeros(m, dtype=int), np.zeros(m, dtype=int)
    found_X: list[np.ndarray] = []
    found_y: list[np.ndarray] = []
    counts = np.zeros(classes, dtype=int)
    while True:
        active = (counts[target] < per_class) & (steps < iter_max)
        if not active.any() or endpoint.left() < active.sum():
            break
        idx = np.flatnonzero(active)
        probs = endpoint(x[idx])  # [A, C]
        steps[idx] += 1
        conf = probs[np.arange(len(idx)), target[idx]]
        better = conf >= best_conf[idx]
        accept = better & (conf > conf_min) & (probs.argmax(axis=1) == target[idx]) & (rng.random(len(idx)) < conf)
        for i in idx[accept]:  # a synthetic record for class target[i]; restart the climber
            if counts[target[i]] < per_class:
                found_X.append(x[i].copy())
                found_y.append(target[i])
                counts[target[i]] += 1
        restart = idx[accept]
        improved = idx[better & ~accept]
        best[improved], best_conf[improved], rejections[improved] = x[improved], conf[better & ~accept], 0
        worse = idx[~better]
        rejections[worse] += 1
        halve = worse[rejections[worse] > rej_max]
        k[halve], rejections[halve] = np.maximum(k_min, np.ceil(k[halve] / 2).astype(int)), 0
        fresh = sample_marginals(pool, len(restart), rng)
        best[restart], best_conf[restart], k[restart], rejections[restart] = fresh, 0.0, k_max, 0
        # next candidates: k features of x* resampled from their marginals
        moving = idx
        resampled = sample_marginals(pool, len(moving), rng)
        cols = np.argsort(rng.random((len(moving), d)), axis=1)
        mask = cols < k[moving][:, None]  # a random set of k columns per climber
        x[moving] = np.where(mask, resampled, best[moving])
    X = np.stack(found_X) if found_X else np.zeros((0, d), np.float32)
    return X.astype(np.float32), np.asarray(found_y, dtype=np.int64), endpoint.spent


@register("model")
def _model(shadow_in: Any, shadow_out: Any, predict: PredictFn, rng: np.random.Generator,
           max_queries: int = 200_000, **options: Any) -> AttackerRecords:  # fmt: skip
    pool = np.concatenate([shadow_in[0], shadow_out[0]])
    classes = int(max(shadow_in[1].max(), shadow_out[1].max())) + 1
    n = len(shadow_in[1]) + len(shadow_out[1])
    X, y, spent = hill_climb(predict, pool, classes, -(-n // classes), rng, max_queries=max_queries, **options)
    if len(y) < 4:
        raise RuntimeError(f"model-based synthesis found only {len(y)} records within {max_queries} queries")
    order = rng.permutation(len(y))
    half = len(y) // 2
    return AttackerRecords(X[order[:half]], y[order[:half]], X[order[half:]], y[order[half:]], spent)
