"""Rank-preserving release (rank_template, hamp), MemGuard's boundary landing and near-duplicate keys."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.defenses.keyed import RowKeyer, output_key_rows
from gateway.defenses.memguard import MemGuard, MemGuardParams
from gateway.defenses.postprocess import Gaussian, GaussianParams
from gateway.defenses.rank import Hamp, HampParams, build_templates
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline, defend_batch, release_vectors
from tests.conftest import CLASSES, WIDTH, FakeRunner, hamp_defense, keys_for, softmax_rows, template_defense

CPU = torch.device("cpu")


def rank_order(p: torch.Tensor) -> torch.Tensor:
    return torch.sort(p, dim=1, descending=True, stable=True).indices


@pytest.mark.parametrize("kind", ["template", "global", "hamp_binary", "hamp_uniform"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 20), c=st.integers(2, 40), scale=st.sampled_from([1e-3, 1.0, 8.0, 50.0]),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())  # fmt: skip
def test_the_whole_ranking_is_kept(kind: str, b: int, c: int, scale: float, seed: int, ties: bool) -> None:
    z = np.random.default_rng(seed).normal(size=(b, c)).astype(np.float32) * scale
    if ties:  # exact ties: the released order breaks them by index, as argmax does
        z[:, 1 % c] = z[:, 0]
    defense: Any = {
        "template": lambda: template_defense(c),
        "global": lambda: template_defense(c, per_class=False),
        "hamp_binary": lambda: hamp_defense(c),
        "hamp_uniform": lambda: hamp_defense(c, inputs="uniform"),
    }[kind]()
    probs = torch.softmax(torch.from_numpy(z).double(), dim=1)
    out = defend_batch(defense, probs, torch.from_numpy(z), keys_for(z), probs.argmax(1))
    assert not out.bad.any()
    assert torch.equal(rank_order(out.released), rank_order(probs))
    assert torch.equal(rank_order(out.released.float()), rank_order(probs)), "order lost in float32"
    assert ((out.released.sum(1) - 1).abs() <= 1e-9).all()


def test_template_values_depend_on_the_label_only() -> None:
    defense = template_defense(8)
    probs = softmax_rows(200, 8, seed=3)
    released = defense.defend(probs, probs.log().float(), keys_for(probs))
    values = torch.sort(released, dim=1, descending=True).values
    labels = probs.argmax(1)
    for k in labels.unique():
        same = values[labels == k]
        assert torch.equal(same, same[:1].expand_as(same)), "two records with one label got different values"


def test_templates_fall_back_to_the_global_one_for_rare_classes() -> None:
    probs = torch.softmax(torch.tensor([[5.0, 0.0, 0.0]] * 30 + [[0.0, 4.0, 0.0]] * 3, dtype=torch.float64), 1)
    t = build_templates(probs, min_rows=10)
    assert torch.equal(t["per_class"][1], t["global"]) and torch.equal(t["per_class"][2], t["global"])
    assert not torch.equal(t["per_class"][0], t["global"])
    assert torch.allclose(t["per_class"][0], torch.sort(probs[0], descending=True).values, atol=1e-4)


def test_hamp_repeats_agree_and_the_values_come_from_random_inputs() -> None:
    defense = hamp_defense(5)
    probs = softmax_rows(50, 5, seed=1)
    keys = keys_for(probs)
    first, again = defense.defend(probs, probs.log().float(), keys), defense.defend(probs, probs.log().float(), keys)
    assert torch.equal(first, again)
    X = defense.random_inputs(keys)
    assert set(np.unique(X)) <= {0.0, 1.0} and 0.3 < X.mean() < 0.7
    other = defense.defend(probs, probs.log().float(), keys_for(probs, secret=b"another"))
    assert not torch.equal(first, other), "the values must follow the key, not the record"


def test_unbound_hamp_fails_closed() -> None:
    probs = softmax_rows(4, 5, seed=2)
    out = defend_batch(Hamp(HampParams(), CPU), probs, probs.log().float(), keys_for(probs), probs.argmax(1))
    assert out.bad.all()


def test_the_pipeline_runs_hamps_extra_forward_pass_on_its_model() -> None:
    runner = FakeRunner()
    defense = Hamp(HampParams(), CPU)
    pipe = Pipeline(runner, defense, classes=CLASSES, output_kind="logits", on_defense_error="reject",
                    metrics=GatewayMetrics(max_batch_size=8), keyer=RowKeyer(b"s", b"c"), device=CPU,
                    features=WIDTH)  # fmt: skip
    x = np.random.default_rng(0).normal(size=(6, WIDTH)).astype(np.float32)
    out = pipe(x)
    assert runner.batches == [6, 6]  # the batch, then its random inputs
    assert not out.rejected.any()
    clean = torch.softmax(torch.from_numpy(x @ runner.W).double(), 1)
    assert torch.equal(rank_order(torch.from_numpy(out.probabilities)), rank_order(clean))
    with pytest.raises(ValueError, match="input width"):
        Pipeline(runner, defense, classes=CLASSES, output_kind="logits", on_defense_error="reject",
                 metrics=GatewayMetrics(max_batch_size=8), keyer=RowKeyer(b"s", b"c"), device=CPU)  # fmt: skip


def test_hamp_keys_on_the_input_so_saturated_rows_do_not_share_a_draw() -> None:
    """Under the output key every row whose clean output is one-hot on a class shares one cell, so one v: the
    release would mark the saturated (member-like) rows. hamp keys on the input whatever the setting says."""
    runner = FakeRunner()
    defense = Hamp(HampParams(inputs="uniform", low=-1.0, high=1.0), CPU)
    pipe = Pipeline(runner, defense, classes=CLASSES, output_kind="logits", on_defense_error="reject",
                    metrics=GatewayMetrics(max_batch_size=64), keyer=RowKeyer(b"s", b"c"), device=CPU,
                    features=WIDTH, noise_key="output")  # fmt: skip
    assert pipe.noise_key == "input"
    rng = np.random.default_rng(0)
    x = (400 * runner.W[:, 0] / np.linalg.norm(runner.W[:, 0]) + rng.normal(size=(20, WIDTH))).astype(np.float32)
    clean = torch.softmax(torch.from_numpy(x @ runner.W).double(), 1).numpy()
    assert len(np.unique(output_key_rows(clean), axis=0)) == 1  # one output cell for all 20 rows
    out = pipe(x).probabilities
    assert len(np.unique(out.max(axis=1))) == 20 and np.array_equal(pipe(x).probabilities, out)  # repeats agree
    defense.bind_model(lambda X: torch.softmax(torch.from_numpy(X @ runner.W).double(), 1).numpy(), WIDTH)
    offline = release_vectors(defense, clean, secret=b"x")
    assert len(np.unique(offline.max(axis=1))) == 20  # offline too: each row its own draw


# --- near-duplicate keys -----------------------------------------------------------------------------
def test_output_keys_are_shared_by_near_duplicates() -> None:
    p = softmax_rows(500, 10, seed=4).numpy()
    jittered = p + np.random.default_rng(0).uniform(-1e-5, 1e-5, p.shape)
    same = (output_key_rows(p) == output_key_rows(jittered)).all(axis=1)
    assert same.mean() > 0.98  # only rows with a class within 1e-5 of a cell boundary differ
    far = (output_key_rows(p) == output_key_rows(softmax_rows(500, 10, seed=5).numpy())).all(axis=1)
    assert far.mean() < 0.05


@pytest.mark.parametrize("noise_key", ["output", "input"])
def test_perturbed_copies_of_a_row_get_the_same_released_vector(noise_key: str) -> None:
    runner = FakeRunner()
    pipe = Pipeline(runner, Gaussian(GaussianParams(sigma=0.1)), classes=CLASSES, output_kind="logits",
                    on_defense_error="reject", metrics=GatewayMetrics(max_batch_size=64),
                    keyer=RowKeyer(b"s", b"c"), device=CPU, noise_key=noise_key)  # type: ignore[arg-type]  # fmt: skip
    x = np.random.default_rng(1).normal(size=(40, WIDTH)).astype(np.float32)
    copies = (x + np.random.default_rng(2).uniform(-1e-4, 1e-4, x.shape)).astype(np.float32)
    # The same draw: the copies' answers differ by what the jitter moved the clean output (~1e-4), not by
    # the noise (σ = 0.1).
    diff = np.abs(pipe(x).probabilities - pipe(copies).probabilities).max(axis=1)  # [40]
    if noise_key == "output":
        assert (diff < 1e-3).mean() >= 0.95
    else:
        assert (diff > 1e-2).mean() >= 0.9, "input keys: every jittered copy is a new query"


def test_offline_release_keys_on_outputs_too() -> None:
    p = softmax_rows(60, 10, seed=6).numpy()
    near = p + np.random.default_rng(3).uniform(-1e-6, 1e-6, p.shape)
    near /= near.sum(1, keepdims=True)
    d = Gaussian(GaussianParams(sigma=0.1))
    a, b = release_vectors(d, p, secret=b"x"), release_vectors(d, near, secret=b"x")
    assert (np.abs(a - b).max(axis=1) < 1e-4).mean() >= 0.95  # the rest straddle a cell boundary


# --- MemGuard's landing --------------------------------------------------------------------------------
@pytest.mark.parametrize("landing", ["crossed", "boundary"])
def test_memguard_landing(defenders: dict[str, Any], landing: str) -> None:
    g = defenders["g"]
    defense = MemGuard(g, MemGuardParams(landing=landing), CPU)  # type: ignore[arg-type]
    z = defenders["z_in"][:64].float()
    probs = torch.softmax(z.double(), 1)
    side = torch.arange(64) % 2 == 0
    phase = defense.phase_one(z, probs.argmax(1), side)
    noisy = torch.softmax(phase.noisy_logits.double(), 1)[phase.has_noise]
    h = defense.g.logit(torch.sort(noisy, dim=1).values.float())
    h0 = phase.h0[phase.has_noise]
    assert phase.has_noise.sum() > 10
    assert torch.equal(noisy.argmax(1), probs.argmax(1)[phase.has_noise]), "label changed"
    crossed = (h * h0 <= 0).float().mean()
    at_boundary = (torch.sigmoid(h) - 0.5).abs() < 1e-3
    if landing == "crossed":
        assert crossed > 0.6, "the published landing overshoots g's decision on most rows"
        assert at_boundary.float().mean() < 0.2
    else:  # the rows whose Phase I point is past g's decision once re-sorted (~3 in 4 here)
        assert at_boundary.float().mean() > 0.7, "boundary landing must sit at g = 0.5"
        past = (h * h0 <= 0)[side[phase.has_noise] & at_boundary]
        assert past.float().mean() > 0.75, "rows told to cross must land just past the decision"
        before = (h * h0 > 0)[~side[phase.has_noise] & at_boundary]
        assert before.float().mean() > 0.75, "the others just before it"
    plain = MemGuard(g, MemGuardParams(landing="crossed"), CPU).phase_one(z, probs.argmax(1))
    assert torch.equal(plain.success, phase.success) and torch.equal(plain.steps, phase.steps)
