"""Per-row keys: HMAC-SHA256(secret, context ‖ row as little-endian float32).

``context`` binds the model version, the defense name and its canonical parameters, so changing
any of them re-keys every row. A defense derives all of its randomness for a row from the row's
32-byte digest, so the same row gets the same answer on every call and on every replica that
shares the secret: averaging repeated queries gains nothing (docs/ALGORITHMS.md §4).

What a row *is* for keying (``GATEWAY_NOISE_KEY``): by default its clean output vector quantized to a
grid (``output_key_rows``), which near-duplicate inputs share, so a jittered copy of a query gets the
same draw; or the exact input bytes (``input``), which only exact repeats share. A perturbation that
moves some output across a grid line still gets a fresh draw (docs/ALGORITHMS.md §4).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, TypeVar

import numpy as np
import torch

DIGEST_BYTES = 32


def key_context(model_version: str, defense: str, params: dict[str, Any]) -> bytes:
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return b"\x00".join((b"mi-gateway/v1", model_version.encode(), defense.encode(), canonical.encode())) + b"\x00"


#: Default grid of ``output_key_rows``: outputs within the same 0.02-wide cell on every class share a key.
OUTPUT_KEY_GRID = 0.02


def output_key_rows(probs: np.ndarray, grid: float = OUTPUT_KEY_GRID) -> np.ndarray:
    """probs[B, C] (clean softmax) -> [B, C] float32 cell indices round(p / grid): what an output key hashes.

    Near-duplicate inputs (a jitter of 1e-4, a re-encoded float) move the output far less than a cell, so
    they share the key unless some class's probability sits within that distance of a cell boundary.
    """
    return np.round(np.asarray(probs, dtype=np.float64) / grid).astype("<f4")


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
    """digests[B, 32] -> u[B] in [0, 1): the first 53 bits as a float64 (docs/ALGORITHMS.md §4)."""
    first8 = np.ascontiguousarray(digests[:, :8]).view(">u8")[:, 0]  # [B] big-endian uint64
    return (first8 >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# --- per-row Philox4x32-10 streams ------------------------------------------------------------
# A counter-based generator (Salmon et al., SC 2011) evaluated with plain integer tensor ops, so
# every row's stream is a pure function of its digest: identical on CPU and CUDA, at any batch
# size or position. 32-bit words live in int64 tensors; products of two 32-bit words may wrap
# past 2^63, but masking recovers the exact high and low halves from the two's-complement bits.
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
Words = TypeVar("Words", torch.Tensor, np.ndarray)  # the same code runs on both


def philox4x32(counter: Words, key: Words, rounds: int = 10) -> Words:
    """counter [..., 4], key [..., 2] (int64 holding uint32) -> [..., 4] uint32 words in int64.

    Plain integer operators only, so the same code runs on torch tensors (any device) and on NumPy
    arrays of at least two dimensions (whose int64 products wrap the same way, silently; NumPy
    scalars would warn).
    """
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key[..., 0], key[..., 1]
    for _ in range(rounds):
        p0 = c0 * _M0
        p1 = c2 * _M1
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    words = (c0, c1, c2, c3)
    return np.stack(words, axis=-1) if isinstance(counter, np.ndarray) else torch.stack(words, dim=-1)


def row_uniforms(digests: torch.Tensor, n: int, *, stream: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """digests [B, 32] uint8 -> u [B, n] float32 in [0, 1), one Philox stream per row.

    Key = digest words 2..3, counter = (block, stream, digest words 4..5): the first 64 bits of
    the digest stay reserved for MemGuard's coin (``uniform_from_digest``). On CPU the rounds run
    in NumPy (about 6x less per-op overhead than PyTorch, which matters at batch 1); elsewhere as
    tensor ops on the device. Both give the same bits (tested).
    """
    device = device or digests.device
    words = np.ascontiguousarray(digests.cpu().numpy()).view("<u4").astype(np.int64)  # [B, 8]
    if device.type == "cpu":
        return _uniforms_numpy(words, n, stream)
    return _uniforms_torch(words, n, stream, device)


def _uniforms_numpy(words: np.ndarray, n: int, stream: int) -> torch.Tensor:
    B, blocks = words.shape[0], (n + 3) // 4
    counter = np.empty((B, blocks, 4), dtype=np.int64)  # [B, K, 4]
    counter[..., 0] = np.arange(blocks)
    counter[..., 1] = stream
    counter[..., 2:4] = words[:, None, 4:6]
    bits = philox4x32(counter, words[:, None, 2:4]).reshape(B, blocks * 4)[:, :n]  # [B, n]
    return torch.from_numpy((bits >> 8).astype(np.float32) * np.float32(1.0 / (1 << 24)))


def _uniforms_torch(words: np.ndarray, n: int, stream: int, device: torch.device) -> torch.Tensor:
    B, blocks = words.shape[0], (n + 3) // 4
    w = torch.from_numpy(words).to(device)
    block = torch.arange(blocks, device=device, dtype=torch.int64)  # [K]
    counter_t = torch.stack(
        (
            block.expand(B, blocks),
            torch.full((B, blocks), stream, device=device, dtype=torch.int64),
            w[:, 4:5].expand(B, blocks),
            w[:, 5:6].expand(B, blocks),
        ),
        dim=-1,
    )  # [B, K, 4]
    bits_t = philox4x32(counter_t, w[:, None, 2:4].expand(B, blocks, 2)).reshape(B, blocks * 4)[:, :n]  # [B, n]
    return (bits_t >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24-bit uniforms
