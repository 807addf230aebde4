"""The attacker's data sources: shapes, domains, query budgets and the flip fraction."""

from __future__ import annotations

import numpy as np
import pytest

from defense_models.audit.attacker_data import attacker_records, flip_features, hill_climb


def endpoint(classes: int = 3, width: int = 20):  # type: ignore[no-untyped-def]
    """A fixed linear softmax model over binary features."""
    W = np.random.default_rng(7).normal(0, 2.0, (width, classes))

    def predict(X: np.ndarray) -> np.ndarray:
        z = X.astype(np.float64) @ W
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    return predict


def real_records(n: int = 60, width: int = 20, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    rng = np.random.default_rng(seed)
    X = (rng.random((2 * n, width)) < 0.3).astype(np.float32)
    y = endpoint()(X).argmax(1)
    return (X[:n], y[:n]), (X[n:], y[n:])


@pytest.mark.parametrize("flip", [0.1, 0.2])
def test_noisy_flips_exactly_the_stated_fraction(flip: float) -> None:
    X = real_records()[0][0]
    noisy = flip_features(X, flip, np.random.default_rng(1))
    assert set(np.unique(noisy)) <= {0.0, 1.0}
    np.testing.assert_array_equal((noisy != X).sum(1), round(flip * X.shape[1]))
    r = attacker_records("noisy", *real_records(), endpoint(), flip=flip)
    assert r.queries == 0 and r.X_in.shape == (60, 20)


def test_noisy_refuses_non_binary_features() -> None:
    with pytest.raises(ValueError, match="not binary"):
        flip_features(np.full((2, 3), 0.5), 0.1, np.random.default_rng(0))


def test_marginal_records_come_from_the_marginals_and_are_labelled_by_the_endpoint() -> None:
    (X_in, y_in), shadow_out = real_records()
    X_in[:, 0] = 1.0  # a constant column
    shadow_out[0][:, 0] = 1.0
    r = attacker_records("marginal", (X_in, y_in), shadow_out, endpoint(), seed=3)
    assert r.X_in.shape == (60, 20) and r.X_out.shape == (60, 20) and r.queries == 120
    assert (r.X_in[:, 0] == 1.0).all() and set(np.unique(r.X_in)) <= {0.0, 1.0}
    np.testing.assert_array_equal(r.y_in, endpoint()(r.X_in).argmax(1))
    with pytest.raises(RuntimeError, match="budget"):
        attacker_records("marginal", (X_in, y_in), shadow_out, endpoint(), max_queries=50)


def test_hill_climbing_finds_confident_records_within_its_budget() -> None:
    (X_in, _), (X_out, _) = real_records()
    pool = np.concatenate([X_in, X_out])
    calls: list[int] = []

    def predict(X: np.ndarray) -> np.ndarray:
        calls.append(len(X))
        return endpoint()(X)

    X, y, spent = hill_climb(predict, pool, 3, 10, np.random.default_rng(0), max_queries=3000)
    assert spent == sum(calls) <= 3000
    assert len(y) > 0 and set(np.unique(X)) <= {0.0, 1.0}
    probs = endpoint()(X)
    np.testing.assert_array_equal(probs.argmax(1), y)  # each record is labelled its class…
    assert (probs[np.arange(len(y)), y] > 0.2).all()  # …with confidence above conf_min
    assert np.bincount(y, minlength=3).max() <= 10
    r = attacker_records("model", (X_in, y), (X_out, y), endpoint(), max_queries=3000)
    assert r.queries <= 3000 and len(r.y_in) + len(r.y_out) > 4


def test_unknown_source_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        attacker_records("gan", *real_records(), endpoint())
