"""AEPPT against its own substitute: the perturbation moves F's decisions where it is told to."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from defense_models.bundle.calibrate import calibrate_aeppt_step, substitute_balanced_accuracy
from gateway.defenses.aeppt import Aeppt, AepptParams
from tests.conftest import keys_for

CPU = torch.device("cpu")


def decisions(defense: Aeppt, probs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    t = torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).float()
    return defense.substitute_logit(out.float(), t) >= 0


@pytest.fixture(scope="module", params=["raw", "log"])
def defenders(
    request: pytest.FixtureRequest, defenders: dict[str, Any], log_defenders: dict[str, Any]
) -> dict[str, Any]:
    """Every test here runs with classifiers on raw probabilities and with g on log features."""
    return defenders if request.param == "raw" else log_defenders


@pytest.fixture(scope="module")
def data(defenders: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.softmax(defenders["z_in"], 1), torch.softmax(defenders["z_out"], 1)


def test_the_substitute_separates_members_before_the_defense(defenders: dict[str, Any], data: Any) -> None:
    p_in, p_out = data
    undefended = Aeppt(defenders["substitute"], AepptParams(step_size=0.0), CPU)
    acc, l1 = substitute_balanced_accuracy(undefended, p_in, p_out)
    assert acc > 0.7 and l1 == 0.0


def test_fixed_direction_flips_the_substitutes_decisions(defenders: dict[str, Any], data: Any) -> None:
    p_in, p_out = data
    probs = torch.cat([p_in, p_out])
    z = torch.log(probs).float()
    raw = Aeppt(defenders["substitute"], AepptParams(step_size=0.01, renormalize="none"), CPU)
    before = decisions(raw, probs, probs)
    after = decisions(raw, probs, raw.defend(probs, z, keys_for(z)))
    assert (before != after).float().mean().item() > 0.9  # on the loop's own output, both directions flip
    # On the simplex, member-looking rows are pushed across; the reverse push mostly cancels out
    # (its sign-gradient is near-uniform and renormalisation removes it): see AepptParams.renormalize.
    simplex = Aeppt(defenders["substitute"], AepptParams(step_size=0.01, renormalize="step"), CPU)
    after = decisions(simplex, probs, simplex.defend(probs, z, keys_for(z)))
    assert (~after[before]).float().mean().item() > 0.9


def test_per_step_direction_hovers_at_the_boundary(defenders: dict[str, Any], data: Any) -> None:
    p_in, p_out = data
    probs = torch.cat([p_in, p_out])
    z = torch.log(probs).float()
    params = AepptParams(step_size=0.001, direction="per_step", renormalize="step")
    d = Aeppt(defenders["substitute"], params, CPU)
    out = d.defend(probs, z, keys_for(z))
    t = torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).float()
    f_before = torch.sigmoid(d.substitute_logit(probs.float(), t))
    f_after = torch.sigmoid(d.substitute_logit(out.float(), t))
    assert (f_after - 0.5).abs().median() < (f_before - 0.5).abs().median() / 10


def test_calibration_reaches_the_target_member_rate(defenders: dict[str, Any], data: Any) -> None:
    p_in, p_out = data
    cal = calibrate_aeppt_step(defenders["substitute"], p_in, p_out)
    assert abs(cal.balanced_accuracy - 0.5) <= 0.01 + 1e-9, cal
    d = Aeppt(defenders["substitute"], AepptParams(step_size=cal.step_size), CPU)
    acc, l1 = substitute_balanced_accuracy(d, p_in, p_out)
    assert abs(acc - cal.balanced_accuracy) < 1e-9 and l1 == pytest.approx(cal.mean_l1)


def test_clip_radius_bounds_every_coordinate(defenders: dict[str, Any], data: Any) -> None:
    probs = data[0][:50]
    z = torch.log(probs).float()
    d = Aeppt(defenders["substitute"], AepptParams(step_size=0.01, clip_eps=0.02, renormalize="none"), CPU)
    out = d.defend(probs, z, keys_for(z))
    assert ((out - probs).abs() <= 0.02 + 1e-6).all()
    assert ((out - probs).abs().sum(1) <= d.l1_bound).all()


def test_fresh_randomness_differs_between_calls(defenders: dict[str, Any], data: Any) -> None:
    probs = data[1][:20]
    z = torch.log(probs).float()
    keyed = Aeppt(defenders["substitute"], AepptParams(step_size=0.01), CPU)
    fresh = Aeppt(defenders["substitute"], AepptParams(step_size=0.01, randomness="fresh"), CPU)
    k = keys_for(z)
    assert torch.equal(keyed.defend(probs, z, k), keyed.defend(probs, z, k))
    assert not torch.equal(fresh.defend(probs, z, k), fresh.defend(probs, z, k))


def test_batched_matches_the_serial_reference(defenders: dict[str, Any], data: Any) -> None:
    from gateway.defenses.keyed import row_uniforms
    from tests.reference import aeppt_reference_row

    probs = torch.cat([data[0][:10], data[1][:10]])
    z = torch.log(probs).float()
    params = AepptParams(step_size=0.004, clip_eps=0.2, dtype="float64")
    d = Aeppt(defenders["substitute"], params, CPU)
    keys = keys_for(z)
    out = d.defend(probs, z, keys)
    r = row_uniforms(keys, params.iterations).double()  # rand_low 0, rand_high 1
    worst = max(
        (out[i] - aeppt_reference_row(defenders["substitute"], probs[i], r[i], params)).abs().max().item()
        for i in range(len(probs))
    )
    assert worst <= 1e-9, worst
    assert (out != probs).any(1).all()


@pytest.mark.parametrize(
    "params",
    [
        AepptParams(step_size=0.004),
        AepptParams(step_size=0.02, clip_eps=0.05),  # the clip box, and label guards firing
        AepptParams(step_size=0.004, dtype="float64"),
    ],
    ids=["box", "clip", "float64"],
)
def test_single_row_path_matches_the_batched_path(defenders: dict[str, Any], data: Any, params: AepptParams) -> None:
    """Batch 1 runs a NumPy loop (``_iterate_row``), batches over 64 rows the bias-folded GEMMs: the
    same answers."""
    probs = torch.cat([data[0][:40], data[1][:40]])  # 80 rows
    z = torch.log(probs).float()
    keys = keys_for(z)
    d = Aeppt(defenders["substitute"], params, CPU)
    batched = d.defend(probs, z, keys)
    single = torch.cat([d.defend(probs[i : i + 1], z[i : i + 1], keys[i : i + 1]) for i in range(len(probs))])
    assert (batched != probs).any(1).all()  # every row moved
    assert (single - batched).abs().max().item() <= (1e-6 if params.dtype == "float32" else 1e-12)
    assert torch.equal(single.argmax(1), probs.argmax(1))


def test_single_row_path_matches_the_serial_reference(defenders: dict[str, Any], data: Any) -> None:
    from gateway.defenses.keyed import row_uniforms
    from tests.reference import aeppt_reference_row

    probs = torch.cat([data[0][:5], data[1][:5]])
    keys = keys_for(torch.log(probs).float())
    params = AepptParams(step_size=0.004, clip_eps=0.2, dtype="float64")
    d = Aeppt(defenders["substitute"], params, CPU)
    r = row_uniforms(keys, params.iterations).double()
    for i in range(len(probs)):
        out = d.defend(probs[i : i + 1], probs[i : i + 1].float(), keys[i : i + 1])[0]
        ref = aeppt_reference_row(defenders["substitute"], probs[i], r[i], params)
        assert (out - ref).abs().max().item() <= 1e-9
