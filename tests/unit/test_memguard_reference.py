"""Batched MemGuard against a plain serial port of the official algorithm (defense_framework.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gateway.defenses.memguard import MemGuard, MemGuardParams
from tests.conftest import keys_for
from tests.reference import memguard_reference_row as reference_row


def official(**params: Any) -> MemGuardParams:
    """The published algorithm (``landing="crossed"``), which the one-row reference implements."""
    return MemGuardParams(landing="crossed", **params)


@pytest.fixture(scope="module", params=["raw", "log"])
def defenders(
    request: pytest.FixtureRequest, defenders: dict[str, Any], log_defenders: dict[str, Any]
) -> dict[str, Any]:
    """Every test here runs with classifiers on raw probabilities and with g on log features."""
    return defenders if request.param == "raw" else log_defenders


@pytest.fixture(scope="module")
def rows(defenders: dict[str, Any]) -> torch.Tensor:
    return torch.cat([defenders["z_in"][:8], defenders["z_out"][:8]])  # [16, C]


@pytest.mark.parametrize(("schedule", "engine"), [("parallel", "torch"), ("sequential", "torch"),
                                                  ("sequential", "compiled")])  # fmt: skip
def test_phase_one_matches_the_serial_reference(
    defenders: dict[str, Any], rows: torch.Tensor, schedule: str, engine: str
) -> None:
    mg = MemGuard(defenders["g"], official(schedule=schedule, dtype="float64", engine=engine), torch.device("cpu"))
    labels = torch.softmax(rows, 1).argmax(1)
    batched = mg.phase_one(rows, labels)
    mismatches = []
    for i in range(rows.shape[0]):
        ref = reference_row(defenders["g"], rows[i], int(labels[i]))
        ran = len(ref.steps)
        got_steps = batched.steps[:ran, i].tolist()
        got_ok = batched.success[:ran, i].tolist()
        if got_steps != ref.steps or got_ok != ref.success or bool(batched.has_noise[i]) != ref.has_noise:
            mismatches.append((i, ref.steps, got_steps, ref.success, got_ok))
            continue
        diff = (batched.noisy_logits[i] - ref.noisy_logits).abs().max().item()
        if diff > 1e-8:
            mismatches.append((i, "noise differs by", diff))
    assert not mismatches, mismatches
    assert batched.has_noise.any() and (batched.rounds_ok > 1).any()  # the test exercises real noise


def test_a_single_row_matches_the_serial_reference(defenders: dict[str, Any], rows: torch.Tensor) -> None:
    """A batch with one row to protect (the compiled loop, three of its four slots empty): same rounds, same
    steps."""
    mg = MemGuard(defenders["g"], official(dtype="float64"), torch.device("cpu"))
    labels = torch.softmax(rows, 1).argmax(1)
    for i in range(rows.shape[0]):
        alone = mg.phase_one(rows[i : i + 1], labels[i : i + 1])
        ref = reference_row(defenders["g"], rows[i], int(labels[i]))
        ran = len(ref.steps)
        assert alone.steps[:ran, 0].tolist() == ref.steps and alone.success[:ran, 0].tolist() == ref.success, i
        assert (alone.noisy_logits[0] - ref.noisy_logits).abs().max().item() <= 1e-8, i


def test_parallel_and_sequential_schedules_agree(defenders: dict[str, Any], rows: torch.Tensor) -> None:
    labels = torch.softmax(rows, 1).argmax(1)
    par = MemGuard(defenders["g"], official(schedule="parallel"), torch.device("cpu")).phase_one(rows, labels)
    seq = MemGuard(defenders["g"], official(schedule="sequential"), torch.device("cpu")).phase_one(rows, labels)
    assert torch.equal(par.rounds_ok, seq.rounds_ok)
    torch.testing.assert_close(par.noisy_logits, seq.noisy_logits, rtol=0, atol=1e-5)
    assert seq.row_iterations <= par.row_iterations  # sequential never runs rounds after a failure


def test_every_window_of_rounds_in_flight_agrees(defenders: dict[str, Any], rows: torch.Tensor) -> None:
    """Rounds in flight per row: 1 (sequential), 7 (parallel), and the windows between, where a row's later
    rounds start as earlier ones succeed and stop once one fails: same kept round, same noise."""
    labels = torch.softmax(rows, 1).argmax(1)
    mg = MemGuard(defenders["g"], official(dtype="float64"), torch.device("cpu"))
    runs = {}
    for window in (1, 2, 3, 7):
        mg._window = lambda rows, w=window: w  # type: ignore[method-assign]
        runs[window] = mg.phase_one(rows, labels)
    for window, run in runs.items():
        assert torch.equal(run.rounds_ok, runs[1].rounds_ok), window
        torch.testing.assert_close(run.noisy_logits, runs[1].noisy_logits, rtol=0, atol=1e-5)
    assert runs[1].row_iterations < runs[2].row_iterations < runs[7].row_iterations


def test_later_round_steps_caps_the_rounds_after_the_first(defenders: dict[str, Any], rows: torch.Tensor) -> None:
    """The faster schedule: every round after the first stops after K steps (counted as failed), so rows keep
    the same or an earlier round; K ≥ 299 is the official schedule; single rows (NumPy) and batches agree.
    Float64, as the serial reference's step counts: in float32 an ulp between differently shaped GEMMs can
    move a sign term and a step count on another CPU."""
    labels = torch.softmax(rows, 1).argmax(1)

    def memguard(**params: Any) -> MemGuard:
        return MemGuard(defenders["g"], official(dtype="float64", **params), torch.device("cpu"))

    official_run = memguard().phase_one(rows, labels)
    same = memguard(later_round_steps=299).phase_one(rows, labels)
    assert torch.equal(same.steps, official_run.steps) and torch.equal(same.rounds_ok, official_run.rounds_ok)
    fast = memguard(later_round_steps=20)
    run = fast.phase_one(rows, labels)
    assert torch.equal(run.steps[0], official_run.steps[0]) and torch.equal(run.success[0], official_run.success[0])
    assert (run.steps[1:] <= 20).all() and (run.rounds_ok <= official_run.rounds_ok).all()
    assert run.row_iterations < official_run.row_iterations
    for i in range(4):
        alone = fast.phase_one(rows[i : i + 1], labels[i : i + 1])
        assert torch.equal(alone.steps[:, 0], run.steps[:, i]) and alone.rounds_ok[0] == run.rounds_ok[i]


def test_auto_schedule_runs_rounds_one_after_another_on_cpu(defenders: dict[str, Any]) -> None:
    mg = MemGuard(defenders["g"], official(), torch.device("cpu"))
    assert mg._window(1) == mg._window(512) == 1
    mg.device = torch.device("cuda")  # only the choice reads it here
    assert (mg._window(8), mg._window(65)) == (7, 1)


def test_batched_equals_one_row_at_a_time(defenders: dict[str, Any], rows: torch.Tensor) -> None:
    mg = MemGuard(defenders["g"], official(), torch.device("cpu"))
    probs = torch.softmax(rows, 1)
    keys = keys_for(rows.float())
    batch = mg.defend(probs, rows.float(), keys)
    for i in range(rows.shape[0]):
        alone = mg.defend(probs[i : i + 1], rows[i : i + 1].float(), keys[i : i + 1])
        assert (alone[0] - batch[i]).abs().max().item() <= 1e-6


def test_the_compiled_loop_answers_a_row_alone_as_in_any_batch(defenders: dict[str, Any]) -> None:
    """Its four slots run the same instructions, so a row's Phase I does not depend on its slot, the rows
    beside it or the batch size; and it takes the same steps as the PyTorch loop."""
    z = torch.cat([defenders["z_in"][:24], defenders["z_out"][:24]]).float()  # 48 rows: slots refill
    labels = torch.softmax(z, 1).argmax(1)
    mg = MemGuard(defenders["g"], official(), torch.device("cpu"))
    batch = mg.phase_one(z, labels)
    for i in range(0, 48, 5):
        alone = mg.phase_one(z[i : i + 1], labels[i : i + 1])
        assert torch.equal(alone.steps[:, 0], batch.steps[:, i]) and alone.rounds_ok[0] == batch.rounds_ok[i], i
        assert (alone.noisy_logits[0] - batch.noisy_logits[i]).abs().max().item() <= 1e-6, i
    # With several torch threads a batch is cut into one part per thread: the same answers.
    threads, mg.ROWS_PER_THREAD = torch.get_num_threads(), 8
    torch.set_num_threads(3)
    try:
        split = mg.phase_one(z, labels)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split.steps, batch.steps) and torch.equal(split.noisy_logits, batch.noisy_logits)
    torch_loop = MemGuard(defenders["g"], official(engine="torch"), torch.device("cpu")).phase_one(z, labels)
    assert torch.equal(torch_loop.rounds_ok, batch.rounds_ok)
    # float32: an ulp between the two loops' sums may move one row's trajectory (docs/ALGORITHMS.md §3)
    assert (torch_loop.steps == batch.steps).all(dim=0).float().mean() >= 0.9
    assert batch.row_iterations > 0 and batch.has_noise.any()


def test_release_probability_follows_the_formula(defenders: dict[str, Any]) -> None:
    z = torch.cat([defenders["z_in"][:100], defenders["z_out"][:100]])
    probs = torch.softmax(z, 1)
    for eps in (0.1, 0.5, 1.0):
        mg = MemGuard(defenders["g"], official(epsilon=eps), torch.device("cpu"))
        phase = mg.phase_one(z.float(), probs.argmax(1))
        noisy, p = mg.release_probability(probs, phase)
        d = (noisy - probs).abs().sum(1)
        g = mg.g
        g_clean = torch.sigmoid(g.logit(torch.sort(probs, 1).values.float()).double())
        g_noisy = torch.sigmoid(g.logit(torch.sort(noisy, 1).values.float()).double())
        helps = (g_clean - 0.5).abs() > (g_noisy - 0.5).abs()
        want = torch.where(helps & phase.has_noise & (d > 0), (eps / d).clamp(max=1), torch.zeros_like(d))
        torch.testing.assert_close(p, want, rtol=0, atol=1e-6)
        assert ((p * d) <= eps + 1e-12).all()  # per row, the expected distortion is within the budget
        assert (noisy.argmax(1) == probs.argmax(1)).all()


def test_empirical_mean_l1_respects_epsilon(defenders: dict[str, Any]) -> None:
    z = torch.cat([defenders["z_in"], defenders["z_out"]])  # 800 rows
    probs = torch.softmax(z, 1)
    keys = keys_for(z.float())
    for eps in (0.05, 0.2):
        out = MemGuard(defenders["g"], official(epsilon=eps), torch.device("cpu")).defend(probs, z.float(), keys)
        l1 = (out - probs).abs().sum(1)
        # E[L1] ≤ ε per row; the sample mean of 800 independent coins stays within a few standard errors.
        se = l1.std().item() / len(l1) ** 0.5
        assert l1.mean().item() <= eps + 3 * se, (eps, l1.mean().item(), se)
        assert (out.argmax(1) == probs.argmax(1)).all()


def test_epsilon_zero_is_the_identity(defenders: dict[str, Any]) -> None:
    z = defenders["z_in"][:10]
    probs = torch.softmax(z, 1)
    out = MemGuard(defenders["g"], official(epsilon=0), torch.device("cpu")).defend(
        probs, z.float(), keys_for(z.float())
    )
    assert torch.equal(out, probs)


def test_jacobian_reuse_changes_nothing(defenders: dict[str, Any]) -> None:
    """Large working sets on CPU keep ∂h/∂s per row and recompute it where g's ReLU pattern changed;
    Phase I must take the same steps and succeed on the same rows as recomputing it at every step,
    with the noisy vectors within the contract's 1e-6. (Not bit-identity: GEMMs over differently
    shaped row subsets may round differently, e.g. with AVX-512 kernels.)"""
    rows = torch.cat([defenders["z_in"][:150], defenders["z_out"][:150]])  # 300 rows
    labels = torch.softmax(rows, 1).argmax(1)
    mg = MemGuard(defenders["g"], official(schedule="sequential", engine="torch"), torch.device("cpu"))
    mg.JACOBIAN_REUSE_ROWS = 10**9  # off
    plain = mg.phase_one(rows, labels)
    mg.JACOBIAN_REUSE_ROWS = 256
    for max_changed in (0.6, 1.0):  # the default, and never giving up (the partial path at every step)
        mg.JACOBIAN_REUSE_MAX_CHANGED = max_changed
        reused = mg.phase_one(rows, labels)
        assert torch.equal(reused.steps, plain.steps) and torch.equal(reused.success, plain.success)
        torch.testing.assert_close(torch.softmax(reused.noisy_logits.double(), 1),
                                   torch.softmax(plain.noisy_logits.double(), 1), rtol=0, atol=1e-6)  # fmt: skip
