"""Membership-inference attacks behind one registry.

An attack is fit on the attacker's shadow data (a shadow model's outputs on its members and
non-members, or the target's own outputs on records the attacker knows) and then scores released
vectors: higher = more likely a member. ``defense_models.scoring.score_attack`` turns scores into
balanced accuracy, AUC and TPR at low FPR.
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from defense_models.attacks.base import Attack, AttackData

__all__ = ["Attack", "AttackData", "available_attacks", "create_attack", "register_attack"]

_REGISTRY: dict[str, type] = {}
_BUILTIN_MODULES = (
    "defense_models.attacks.metric",
    "defense_models.attacks.nn_sorted",
    "defense_models.attacks.learned",
)
_loaded = False
T = TypeVar("T", bound=type)


def register_attack(cls: T) -> T:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"attack {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def available_attacks() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def create_attack(name: str, **options: Any) -> Attack:
    _load_builtins()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {available_attacks()}") from None
    attack: Attack = cls(**options)
    return attack
