"""Defenses behind the HTTP API: defended, repeat-proof, configured, and refused when unsafe."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import BundleError
from tests.conftest import make_settings, metric_value, rows, serving

SECRET = "0123456789abcdef0123456789abcdef"


async def undefended(bundle: Path, x: list[list[float]]) -> np.ndarray:
    async with serving(make_settings(bundle)) as (client, _):
        return np.array((await client.post("/predict", json={"instances": x})).json()["probabilities"])


@pytest.mark.parametrize("defense", ["memguard", "aeppt", "topk", "rounding", "temperature", "label_only", "gaussian"])
async def test_defended_predictions_keep_labels_and_repeat_exactly(defended_bundle: Path, defense: str) -> None:
    x = rows(24, seed=5)
    clean = await undefended(defended_bundle, x)
    settings = make_settings(defended_bundle, defense=defense, noise_secret=SECRET, max_queue_delay_ms=5)
    async with serving(settings) as (client, _):
        first = (await client.post("/predict", json={"instances": x})).json()
        assert first["defense"] == defense
        p = np.array(first["probabilities"])
        assert first["labels"] == clean.argmax(1).tolist() == p.argmax(1).tolist()
        assert np.abs(p.sum(1) - 1).max() <= 1e-6 and (p >= 0).all()
        assert np.abs(p - clean).sum(1).max() > 1e-3  # something was defended
        # the same rows again, alone and mixed into other batches: identical answers
        singles = await asyncio.gather(*(client.post("/predict", json={"instances": [r]}) for r in x[:6]))
        for i, r in enumerate(singles):
            assert np.abs(np.array(r.json()["probabilities"][0]) - p[i]).max() <= 1e-6
        again = np.array((await client.post("/predict", json={"instances": x[::-1]})).json()["probabilities"])[::-1]
        assert np.abs(again - p).max() <= 1e-6
        text = (await client.get("/metrics")).text
        assert metric_value(text, "gateway_label_changes_total", defense=defense) == 0
        assert metric_value(text, "gateway_defended_rows_total", defense=defense, outcome="fallback") == 0
        assert metric_value(text, "gateway_defended_rows_total", defense=defense, outcome="perturbed") > 0
        assert metric_value(text, "gateway_defense_l1_distortion_sum", defense=defense) > 0


async def test_another_secret_gives_other_noise(defended_bundle: Path) -> None:
    x = rows(24, seed=6)
    answers = []
    for secret in (SECRET, SECRET[::-1]):
        async with serving(make_settings(defended_bundle, defense="aeppt", noise_secret=secret)) as (client, _):
            answers.append(np.array((await client.post("/predict", json={"instances": x})).json()["probabilities"]))
    assert np.abs(answers[0] - answers[1]).max() > 1e-4
    assert (answers[0].argmax(1) == answers[1].argmax(1)).all()


async def test_randomized_defense_refuses_the_default_secret_outside_demo(defended_bundle: Path) -> None:
    with pytest.raises(BundleError, match="GATEWAY_NOISE_SECRET"):
        async with serving(make_settings(defended_bundle, defense="memguard")):
            pass
    async with serving(make_settings(defended_bundle, defense="memguard", demo=True)) as (client, _):
        assert (await client.get("/readyz")).status_code == 200
    async with serving(make_settings(defended_bundle, defense="topk")) as (client, _):  # not randomized
        assert (await client.get("/readyz")).status_code == 200


async def test_epsilon_override_zero_disables_memguard(defended_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = rows(8, seed=7)
    clean = await undefended(defended_bundle, x)
    monkeypatch.setenv("GATEWAY_MEMGUARD_EPSILON", "0")
    settings = make_settings(defended_bundle, defense="memguard", noise_secret=SECRET)
    async with serving(settings) as (client, app):
        assert app.state.gateway.defense.params()["epsilon"] == 0
        p = np.array((await client.post("/predict", json={"instances": x})).json()["probabilities"])
    np.testing.assert_allclose(p, clean, atol=1e-12)


async def test_generic_parameter_overrides_are_validated(defended_bundle: Path) -> None:
    settings = make_settings(defended_bundle, defense="aeppt", noise_secret=SECRET, defense_params={"iterations": "7"})
    async with serving(settings) as (_, app):
        assert app.state.gateway.defense.params()["iterations"] == 7
    bad = make_settings(defended_bundle, defense="aeppt", noise_secret=SECRET, defense_params={"nonsense": 1})
    with pytest.raises(ValueError, match="nonsense"):
        async with serving(bad):
            pass


async def test_missing_weights_and_unknown_defense_are_clear(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="no MemGuard classifier"):
        async with serving(make_settings(tiny_bundle, defense="memguard", noise_secret=SECRET)):
            pass
    with pytest.raises(ValueError, match="unknown defense 'memguardd'"):
        async with serving(make_settings(tiny_bundle, defense="memguardd")):
            pass
