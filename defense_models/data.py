"""Datasets behind one registry, and named splits.

A loader returns a ``Dataset`` (float32 features, int64 labels 0..C-1). Location30 ships with
the package (see ``datasets/README.md`` for its provenance); other formats are read from files
the user supplies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "Split", "available_datasets", "load_dataset", "memguard_split", "register_dataset"]


@dataclass(frozen=True)
class Dataset:
    name: str
    X: np.ndarray  # [N, D] float32
    y: np.ndarray  # [N] int64 in 0..classes-1
    classes: int
    sha256: str  # of the canonical arrays, recorded in manifests

    @property
    def width(self) -> int:
        return int(self.X.shape[1])


@dataclass(frozen=True)
class Split:
    """Disjoint index sets into a Dataset; recorded in the manifest."""

    name: str
    seed: int | None
    parts: dict[str, np.ndarray]  # role -> int64 indices

    def sizes(self) -> dict[str, int]:
        return {k: int(v.size) for k, v in self.parts.items()}

    def check_disjoint(self) -> None:
        seen: set[int] = set()
        for role, idx in self.parts.items():
            s = set(idx.tolist())
            if len(s) != idx.size or seen & s:
                raise ValueError(f"split {self.name!r}: part {role!r} overlaps another part or repeats rows")
            seen |= s


Loader = Callable[[Path | None], Dataset]
_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


def load_dataset(name: str, path: Path | None = None) -> Dataset:
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {available_datasets()}") from None
    return loader(path)


def _digest(X: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


def _bundled(name: str) -> Path:
    return Path(str(resources.files("defense_models") / "datasets" / name))


@register_dataset("location30")
def load_location30(path: Path | None = None) -> Dataset:
    """Location30 (Shokri et al. 2017): 5,010 × 446 binary features, 30 classes."""
    with np.load(path or _bundled("location30.npz")) as d:
        X = np.unpackbits(d["features_packed"], axis=1, count=int(d["n_features"])).astype(np.float32)
        y = d["labels"].astype(np.int64)
    return Dataset("location30", X, y, int(y.max()) + 1, _digest(X, y))


def memguard_split(n_rows: int = 5010, index_path: Path | None = None) -> Split:
    """MemGuard's published Location30 split (``config.ini`` of jinyuan-jia/MemGuard)."""
    with np.load(index_path or _bundled("memguard_shuffle_index.npz")) as d:
        idx = d["x"].astype(np.int64)
    if idx.size != n_rows:
        raise ValueError(f"the MemGuard index has {idx.size} rows, the dataset {n_rows}")
    split = Split(
        "memguard",
        None,
        {
            "target_train": idx[0:1000],  # members; g's members; evaluation members
            "target_test": idx[1000:2000],  # g's non-members; reference set D'
            "eval_nonmember": idx[2000:3000],  # evaluation non-members, unseen by g
            "shadow_in": idx[3000:3500],
            "shadow_out": idx[4000:4500],
        },
    )
    split.check_disjoint()
    return split
