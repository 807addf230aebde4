"""``none``: releases the clean softmax. The undefended baseline and a test double."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from gateway.defenses import register_defense


@register_defense
class IdentityDefense:
    name: ClassVar[str] = "none"
    randomized: ClassVar[bool] = False
    l1_bound = 0.0

    @classmethod
    def from_bundle(cls, bundle: object, overrides: dict[str, Any], device: torch.device) -> IdentityDefense:
        if overrides:
            raise ValueError(f"defense 'none' takes no parameters, got {sorted(overrides)}")
        return cls()

    def params(self) -> dict[str, Any]:
        return {}

    def defend(self, probs: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return probs  # [B, C]
