"""Settings: one test per precedence rule, parsing, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings


def build(**kw: object) -> GatewaySettings:
    return GatewaySettings(_env_file=None, **kw)  # type: ignore[call-arg]


def test_defaults(tmp_path: Path) -> None:
    s = build(artifacts=tmp_path)
    assert (s.host, s.port, s.defense, s.on_defense_error) == ("127.0.0.1", 8000, "none", "reject")
    assert s.all_api_keys() == () and s.uses_default_secret()


def test_environment_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("GATEWAY_MAX_BATCH_SIZE", "17")
    monkeypatch.setenv("GATEWAY_DEFENSE_PARAMS__EPSILON", "0.5")
    s = build()
    assert s.artifacts == tmp_path and s.max_batch_size == 17 and s.defense_params == {"epsilon": "0.5"}


def test_keyword_arguments_override_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "9000")
    assert build(artifacts=tmp_path, port=9100).port == 9100


def test_dotenv_file_is_below_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text(f"GATEWAY_ARTIFACTS={tmp_path}\nGATEWAY_PORT=9001\n")
    assert GatewaySettings(_env_file=env).port == 9001  # type: ignore[call-arg]
    monkeypatch.setenv("GATEWAY_PORT", "9002")
    assert GatewaySettings(_env_file=env).port == 9002  # type: ignore[call-arg]


def test_api_keys_from_comma_list_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "alpha, beta,,")
    keyfile = tmp_path / "keys"
    keyfile.write_text("gamma\n\n delta \n")
    s = build(artifacts=tmp_path, api_keys_file=keyfile)
    assert s.all_api_keys() == (b"alpha", b"beta", b"gamma", b"delta")
    assert "alpha" not in repr(s)  # secrets never print


def test_nothing_to_serve_is_refused() -> None:
    with pytest.raises(ValidationError, match="nothing to serve"):
        build()


def test_invalid_values_are_refused(tmp_path: Path) -> None:
    for bad in ({"max_batch_size": 0}, {"on_defense_error": "release"}, {"port": 70000}):
        with pytest.raises(ValidationError):
            build(artifacts=tmp_path, **bad)


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = build(artifacts=tmp_path)
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


def test_env_example_lists_every_setting() -> None:
    text = (Path(__file__).parents[2] / "deploy" / "gateway.env.example").read_text()
    missing = [n for n in GatewaySettings.model_fields if f"GATEWAY_{n.upper()}=" not in text]
    assert not missing, f"add these to deploy/gateway.env.example: {missing}"


def test_the_noise_key_grid_default_is_the_release_paths() -> None:
    """Settings repeat the literal (importing keyed would import torch); the offline release path uses keyed's."""
    from gateway.defenses.keyed import OUTPUT_KEY_GRID

    assert GatewaySettings.model_fields["noise_key_grid"].default == OUTPUT_KEY_GRID


def test_thread_placement_defaults(tmp_path: Path) -> None:
    """One torch thread; ORT stops spinning only before a defense with long batches; explicit settings win."""
    plans = {d: build(artifacts=tmp_path, defense=d).threads() for d in ("none", "aeppt", "memguard")}
    assert {d: (p.torch_threads, p.ort_spinning) for d, p in plans.items()} == {
        "none": (1, True), "aeppt": (1, True), "memguard": (1, False)}  # fmt: skip
    forced = build(artifacts=tmp_path, defense="memguard", ort_allow_spinning=True, torch_threads=3).threads()
    assert (forced.torch_threads, forced.ort_spinning) == (3, True)
    assert "spinning on" in forced.describe()
