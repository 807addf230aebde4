"""The attack interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class AttackData:
    """Released vectors and the records' true labels."""

    probs: np.ndarray  # [N, C] float64, rows on the simplex
    labels: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@runtime_checkable
class Attack(Protocol):
    name: ClassVar[str]
    #: Whether the attack reads confidence values (every attack but the gap attack's label check); the
    #: audit's "best confidence-based attack" is taken over these.
    reads_confidences: ClassVar[bool]

    def fit(self, members: AttackData, nonmembers: AttackData) -> None:
        """Learn from the attacker's data: outputs on known members and known non-members."""
        ...

    def score(self, data: AttackData) -> np.ndarray:
        """[N] membership scores; higher = more likely a member."""
        ...
