"""Each attack beats chance on an overfit model, and falls to the label-only floor on one-hot outputs."""

from __future__ import annotations

import numpy as np
import pytest

from defense_models.audit.attacks import AttackData, available_attacks, create_attack
from defense_models.audit.attacks.nn_sorted import NnSortedAttack
from defense_models.audit.scoring import gap_floor, score_attack
from defense_models.training.loop import FitConfig

C = 10


def outputs(n: int, margin: float, accuracy: float, seed: int) -> AttackData:
    """An overfit model's outputs: members get confident correct vectors, non-members flatter, partly wrong."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    z = rng.normal(size=(n, C))
    correct = rng.random(n) < accuracy
    predicted = np.where(correct, y, (y + rng.integers(1, C, n)) % C)
    z[np.arange(n), predicted] += margin + rng.normal(size=n)
    p = np.exp(z - z.max(1, keepdims=True))
    return AttackData(p / p.sum(1, keepdims=True), y)


SHADOW = (outputs(400, 6.0, 1.0, 1), outputs(400, 2.5, 0.6, 2))
TARGET = (outputs(400, 6.0, 1.0, 3), outputs(400, 2.5, 0.6, 4))
FAST = FitConfig(epochs=30, batch_size=64, lr=1e-3)
QUICK = {name: {"fit_config": FAST} for name in ("nn_sorted", "shokri", "inference_model")}


def one_hot(d: AttackData) -> AttackData:
    return AttackData(np.eye(C)[d.probs.argmax(1)], d.labels)


@pytest.mark.parametrize(
    "name", ["confidence", "entropy", "modified_entropy", "gap", "nn_sorted", "shokri", "shokri_one", "inference_model"]
)
def test_attack_beats_chance_then_falls_to_the_floor_on_labels_only(name: str) -> None:
    attack = create_attack(name, **QUICK.get(name, {}))
    attack.fit(*SHADOW)
    shadow_scores = (attack.score(SHADOW[0]), attack.score(SHADOW[1]))
    s = score_attack(attack.score(TARGET[0]), attack.score(TARGET[1]), shadow=shadow_scores)
    assert s.balanced_accuracy > 0.65 and s.auc > 0.65, s
    # On label-only outputs nothing beyond correctness is left: at most the gap attack's floor.
    acc_in = float((TARGET[0].probs.argmax(1) == TARGET[0].labels).mean())
    acc_out = float((TARGET[1].probs.argmax(1) == TARGET[1].labels).mean())
    floor = gap_floor(acc_in, acc_out)
    attack = create_attack(name, **QUICK.get(name, {}))
    attack.fit(one_hot(SHADOW[0]), one_hot(SHADOW[1]))
    s = score_attack(attack.score(one_hot(TARGET[0])), attack.score(one_hot(TARGET[1])))
    assert s.oracle_balanced_accuracy <= floor + 1e-9, (s.oracle_balanced_accuracy, floor)


def test_gap_attack_is_exactly_the_floor() -> None:
    attack = create_attack("gap")
    s = score_attack(attack.score(TARGET[0]), attack.score(TARGET[1]))
    acc_in = (TARGET[0].probs.argmax(1) == TARGET[0].labels).mean()
    acc_out = (TARGET[1].probs.argmax(1) == TARGET[1].labels).mean()
    assert s.oracle_balanced_accuracy == pytest.approx(gap_floor(acc_in, acc_out))


def test_registry() -> None:
    assert {"confidence", "entropy", "modified_entropy", "gap", "nn_sorted", "shokri", "inference_model"} <= set(
        available_attacks()
    )
    with pytest.raises(ValueError, match="unknown attack"):
        create_attack("nope")
    with pytest.raises(RuntimeError, match="fit the attack first"):
        NnSortedAttack().score(TARGET[0])


def test_a_larger_attacker_set_trains_the_same_optimizer_steps() -> None:
    """The learned attacks' schedules are set in epochs of ``SCHEDULE_ROWS`` rows; 10× the rows train a tenth of
    the epochs (milestones alike), so an attack on Fashion-MNIST's 10,000-row sets costs what it does on
    Location30's 1,000, and a set up to that size keeps the schedule."""
    from defense_models.audit.attacks.learned import SCHEDULE_ROWS
    from defense_models.audit.attacks.nn_sorted import OFFICIAL_FIT
    from defense_models.training.loop import same_steps

    assert same_steps(OFFICIAL_FIT, SCHEDULE_ROWS, SCHEDULE_ROWS) == OFFICIAL_FIT
    assert same_steps(OFFICIAL_FIT, 10, SCHEDULE_ROWS) == OFFICIAL_FIT
    big = same_steps(OFFICIAL_FIT, 10 * SCHEDULE_ROWS, SCHEDULE_ROWS)
    assert (big.epochs, big.lr_milestones) == (40, (30,)) and big.lr == OFFICIAL_FIT.lr
    steps = lambda c, rows: c.epochs * -(-rows // c.batch_size)  # noqa: E731
    for rows in (1_500, 7_777, 100_000):
        scaled = same_steps(FAST, rows, SCHEDULE_ROWS)
        assert abs(steps(scaled, rows) - steps(FAST, SCHEDULE_ROWS)) <= steps(FAST, SCHEDULE_ROWS) * 0.05 + rows / 64
    assert same_steps(FAST, 10**9, SCHEDULE_ROWS).epochs == 1


def test_each_learned_attack_fits_with_the_scaled_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """nn_sorted, shokri (shared and per-class models) and inference_model hand ``fit`` the scaled schedule."""
    from defense_models.audit.attacks import learned, nn_sorted

    seen: list[tuple[int, int]] = []

    def record(model: object, X: object, y: object, config: FitConfig, **kw: object) -> None:
        seen.append((len(y), config.epochs))  # type: ignore[arg-type]

    monkeypatch.setattr(learned, "fit", record)
    monkeypatch.setattr(nn_sorted, "fit", record)
    big = (outputs(3_000, 6.0, 1.0, 5), outputs(3_000, 2.5, 0.6, 6))
    for name in ("nn_sorted", "shokri", "inference_model"):
        seen.clear()
        create_attack(name).fit(*big)
        base = {"nn_sorted": 400}.get(name, 100)
        assert seen and all(e == max(1, round(base * min(1.0, learned.SCHEDULE_ROWS / n))) for n, e in seen), seen
