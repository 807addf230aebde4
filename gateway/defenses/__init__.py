"""Registry of defenses: one name per interchangeable algorithm.

``register_defense`` is a class decorator; duplicates and unknown names raise. A defense class
provides ``from_bundle(bundle, overrides, device)`` which reads its weights and calibrated
parameters from the artifact bundle (``overrides`` come from ``GATEWAY_DEFENSE_PARAMS__*``).
Modules of built-in defenses are imported lazily on first lookup, so importing ``gateway``
stays cheap.
"""

from __future__ import annotations

from typing import Any

import torch

from gateway.defenses.base import Defense
from gateway.registry import Registry

__all__ = ["Defense", "available_defenses", "create_defense", "register_defense", "unregister_defense"]

REGISTRY = Registry(
    "defense",
    (
        "gateway.defenses.identity",
        "gateway.defenses.memguard",
        "gateway.defenses.aeppt",
        "gateway.defenses.postprocess",
        "gateway.defenses.rank",
    ),
)
register_defense = REGISTRY.register
unregister_defense = REGISTRY.unregister
available_defenses = REGISTRY.names


def create_defense(name: str, bundle: Any, overrides: dict[str, Any], device: torch.device) -> Defense:
    cls: type[Defense] = REGISTRY.get(name)
    return cls.from_bundle(bundle, overrides, device)
