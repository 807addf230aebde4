"""Repeat-proof randomness: same row → same answer anywhere; different rows or secrets → independent."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from gateway.defenses.aeppt import Aeppt, AepptParams
from gateway.defenses.keyed import RowKeyer, key_context, philox4x32, row_uniforms, uniform_from_digest
from gateway.defenses.memguard import MemGuard, MemGuardParams
from gateway.defenses.postprocess import Gaussian, GaussianParams
from tests.conftest import keys_for


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123 known-answer vectors for philox4x32-10
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ],
)
def test_philox_known_answers(counter: list[int], key: list[int], expected: list[int]) -> None:
    out = philox4x32(torch.tensor(counter, dtype=torch.int64), torch.tensor(key, dtype=torch.int64))
    assert out.tolist() == expected
    # the same rounds on NumPy arrays (the CPU path of row_uniforms)
    assert philox4x32(np.array([counter], dtype=np.int64), np.array([key], dtype=np.int64))[0].tolist() == expected


@pytest.mark.parametrize("stream", [0, 1])
def test_numpy_and_tensor_streams_agree(stream: int) -> None:
    """CPU draws run in NumPy, other devices as tensor ops: the bits must be identical."""
    from gateway.defenses.keyed import _uniforms_numpy, _uniforms_torch

    words = np.random.default_rng(stream).integers(0, 2**32, size=(50, 8), dtype=np.int64)
    for n in (1, 4, 37, 100):
        a = _uniforms_numpy(words, n, stream)
        assert torch.equal(a, _uniforms_torch(words, n, stream, torch.device("cpu")))
        assert a.shape == (50, n) and a.dtype == torch.float32


def test_digest_is_a_function_of_secret_context_and_row() -> None:
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    a = RowKeyer(b"s1", key_context("v1", "memguard", {"epsilon": 1.0})).digests(x)
    assert np.array_equal(a, RowKeyer(b"s1", key_context("v1", "memguard", {"epsilon": 1.0})).digests(x))
    assert np.array_equal(a[2:3], RowKeyer(b"s1", key_context("v1", "memguard", {"epsilon": 1.0})).digests(x[2:3]))
    for other in (
        RowKeyer(b"s2", key_context("v1", "memguard", {"epsilon": 1.0})),
        RowKeyer(b"s1", key_context("v2", "memguard", {"epsilon": 1.0})),
        RowKeyer(b"s1", key_context("v1", "memguard", {"epsilon": 0.5})),
    ):
        assert not (other.digests(x) == a).all(axis=1).any()
    assert len({bytes(r) for r in a}) == 5


def test_uniform_streams_are_batch_invariant_and_look_uniform() -> None:
    x = np.random.default_rng(1).normal(size=(3000, 4)).astype(np.float32)
    keys = keys_for(x)
    u = row_uniforms(keys, 100)
    assert torch.equal(u[17:18], row_uniforms(keys[17:18], 100))
    assert torch.equal(u[5:9, :37], row_uniforms(keys[5:9], 37))
    assert 0 <= u.min() and u.max() < 1
    flat = u.flatten().numpy()
    hist = np.histogram(flat, bins=10, range=(0, 1))[0] / flat.size
    assert np.abs(hist - 0.1).max() < 0.005
    # independent across rows and across iterations
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.06
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.06
    coin = uniform_from_digest(keys.numpy())
    other = uniform_from_digest(keys_for(x, secret=b"another").numpy())
    assert abs(coin.mean() - 0.5) < 0.02 and abs(np.corrcoef(coin, other)[0, 1]) < 0.06


@pytest.mark.parametrize("name", ["memguard", "aeppt", "gaussian"])
def test_a_row_gets_the_same_answer_alone_or_in_any_batch(name: str, defenders: dict[str, Any]) -> None:
    cpu = torch.device("cpu")
    defense = {
        "memguard": lambda: MemGuard(defenders["g"], MemGuardParams(epsilon=0.3), cpu),
        "aeppt": lambda: Aeppt(defenders["substitute"], AepptParams(step_size=defenders["calibration"].step_size), cpu),
        "gaussian": lambda: Gaussian(GaussianParams(sigma=0.05)),
    }[name]()
    z = torch.cat([defenders["z_in"][:20], defenders["z_out"][:20]]).float()  # [40, C]
    probs = torch.softmax(z.double(), 1)
    keys = keys_for(z)
    full = defense.defend(probs, z, keys)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    shuffled = defense.defend(probs[perm], z[perm], keys[perm])
    assert (shuffled - full[perm]).abs().max().item() <= 1e-6
    for i in (0, 7, 39):
        alone = defense.defend(probs[i : i + 1], z[i : i + 1], keys[i : i + 1])
        assert (alone[0] - full[i]).abs().max().item() <= 1e-6
    changed_full = (full != probs).any(1)
    changed_shuffled = (shuffled != probs[perm]).any(1)
    assert torch.equal(changed_full[perm], changed_shuffled)  # identical coin decisions
    other = defense.defend(probs, z, keys_for(z, secret=b"other-secret"))
    if name != "memguard":  # MemGuard's coin only matters where 0 < p < 1
        assert not torch.equal(other, full)
