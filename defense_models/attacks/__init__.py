"""Membership-inference attacks behind one registry.

An attack is fit on the attacker's shadow data (a shadow model's outputs on its members and
non-members, or the target's own outputs on records the attacker knows) and then scores released
vectors: higher = more likely a member. ``defense_models.scoring.score_attack`` turns scores into
balanced accuracy, AUC and TPR at low FPR.
"""

from __future__ import annotations

from typing import Any

from defense_models.attacks.base import Attack, AttackData
from gateway.registry import Registry

__all__ = ["Attack", "AttackData", "available_attacks", "create_attack", "register_attack"]

REGISTRY = Registry(
    "attack",
    ("defense_models.attacks.metric", "defense_models.attacks.nn_sorted", "defense_models.attacks.learned"),
)
register_attack = REGISTRY.register
available_attacks = REGISTRY.names


def create_attack(name: str, **options: Any) -> Attack:
    attack: Attack = REGISTRY.get(name)(**options)
    return attack
