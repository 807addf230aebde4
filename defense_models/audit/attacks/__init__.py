"""Membership-inference attacks behind one registry.

An attack is fit on the attacker's shadow data (a shadow model's outputs on its members and
non-members, or the target's own outputs on records the attacker knows) and then scores released
vectors: higher = more likely a member. ``defense_models.audit.scoring.score_attack`` turns scores into
balanced accuracy, AUC and TPR at low FPR.
"""

from __future__ import annotations

from typing import Any

from defense_models.audit.attacks.base import Attack, AttackData
from gateway.registry import Registry

__all__ = ["Attack", "AttackData", "available_attacks", "create_attack", "reads_confidences", "register_attack"]

REGISTRY = Registry(
    "attack",
    tuple(f"defense_models.audit.attacks.{m}" for m in ("metric", "nn_sorted", "learned")),
)
register_attack = REGISTRY.register
available_attacks = REGISTRY.names


def reads_confidences(name: str) -> bool:
    return bool(getattr(REGISTRY.get(name), "reads_confidences", True))


def create_attack(name: str, **options: Any) -> Attack:
    attack: Attack = REGISTRY.get(name)(**options)
    return attack
