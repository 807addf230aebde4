"""Registry of defenses: one name per interchangeable algorithm.

``register_defense`` is a class decorator; duplicates and unknown names raise. A defense class
provides ``from_bundle(bundle, overrides, device)`` which reads its weights and calibrated
parameters from the artifact bundle (``overrides`` come from ``GATEWAY_DEFENSE_PARAMS__*``).
Modules of built-in defenses are imported lazily on first lookup, so importing ``gateway``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

import torch

from gateway.defenses.base import Defense

__all__ = ["Defense", "available_defenses", "create_defense", "register_defense", "unregister_defense"]

_REGISTRY: dict[str, type] = {}
_BUILTIN_MODULES = (
    "gateway.defenses.identity",
    "gateway.defenses.memguard",
    "gateway.defenses.aeppt",
    "gateway.defenses.postprocess",
)
_loaded = False

T = TypeVar("T", bound=type)


def register_defense(cls: T) -> T:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"defense {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def unregister_defense(name: str) -> None:
    """For tests that register a dummy."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def available_defenses() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def create_defense(name: str, bundle: Any, overrides: dict[str, Any], device: torch.device) -> Defense:
    _load_builtins()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown defense {name!r}; choose one of {available_defenses()}") from None
    defense: Defense = cls.from_bundle(bundle, overrides, device)  # type: ignore[attr-defined]
    return defense
