"""Per-row keys: HMAC-SHA256(secret, context ‖ row as little-endian float32).

``context`` binds the model version, the defense name and its canonical parameters, so changing
any of them re-keys every row. A defense derives all of its randomness for a row from the row's
32-byte digest, so the same row gets the same answer on every call and on every replica that
shares the secret: averaging repeated queries gains nothing (ALGORITHMS.md §4). Only exact
repeats are covered; near-duplicates get fresh draws.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import numpy as np

DIGEST_BYTES = 32


def key_context(model_version: str, defense: str, params: dict[str, Any]) -> bytes:
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return b"\x00".join((b"mi-gateway/v1", model_version.encode(), defense.encode(), canonical.encode())) + b"\x00"


class RowKeyer:
    def __init__(self, secret: bytes, context: bytes) -> None:
        # Pre-keyed HMAC: copying it per row skips re-deriving the inner/outer pads.
        self._base = hmac.new(secret, context, hashlib.sha256)

    def digests(self, rows: np.ndarray) -> np.ndarray:
        """rows[B, D] (any float dtype) -> digests[B, 32] uint8."""
        x = np.ascontiguousarray(rows, dtype="<f4")  # [B, D] little-endian float32
        out = np.empty((x.shape[0], DIGEST_BYTES), dtype=np.uint8)
        for i in range(x.shape[0]):
            h = self._base.copy()
            h.update(x[i].tobytes())
            out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
        return out


def uniform_from_digest(digests: np.ndarray) -> np.ndarray:
    """digests[B, 32] -> u[B] in [0, 1): the first 53 bits as a float64 (ALGORITHMS.md §4)."""
    first8 = np.ascontiguousarray(digests[:, :8]).view(">u8")[:, 0]  # [B] big-endian uint64
    return (first8 >> np.uint64(11)).astype(np.float64) / float(1 << 53)
