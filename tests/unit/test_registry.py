"""Defense registry: duplicates and unknown names raise; a dummy registers and cleans up."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from gateway.defenses import available_defenses, create_defense, register_defense, unregister_defense


def test_builtins_are_listed() -> None:
    assert "none" in available_defenses()


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown defense 'nope'; choose one of \["):
        create_defense("nope", None, {}, torch.device("cpu"))


def test_register_dummy_then_duplicate_raises() -> None:
    @register_defense
    class Dummy:
        name: ClassVar[str] = "dummy-test"
        randomized: ClassVar[bool] = False

        @classmethod
        def from_bundle(cls, bundle: object, overrides: dict, device: torch.device) -> Dummy:
            return cls()

    try:
        assert isinstance(create_defense("dummy-test", None, {}, torch.device("cpu")), Dummy)
        with pytest.raises(ValueError, match="already registered"):

            @register_defense
            class Other(Dummy):
                pass

    finally:
        unregister_defense("dummy-test")
    assert "dummy-test" not in available_defenses()


def test_none_takes_no_parameters() -> None:
    with pytest.raises(ValueError, match="takes no parameters"):
        create_defense("none", None, {"epsilon": 1}, torch.device("cpu"))


def test_function_families_register_by_name_and_refuse_duplicates() -> None:
    from gateway.registry import Registry

    trainers = Registry("trainer")

    @trainers.function("plain")
    def plain() -> str:
        return "plain"

    assert trainers.get("plain") is plain and trainers.names() == ["plain"]
    with pytest.raises(ValueError, match="already registered"):
        trainers.function("plain")(lambda: "other")
    with pytest.raises(ValueError, match=r"unknown trainer 'nope'; choose one of \['plain'\]"):
        trainers.get("nope")
