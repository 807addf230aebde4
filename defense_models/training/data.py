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

from gateway.registry import Registry

__all__ = [
    "Dataset",
    "Split",
    "available_datasets",
    "load_dataset",
    "make_split",
    "memguard_split",
    "random_split",
    "register_dataset",
]


@dataclass(frozen=True)
class Dataset:
    name: str
    X: np.ndarray  # [N, D] float32
    y: np.ndarray  # [N] int64 in 0..classes-1
    classes: int
    sha256: str  # of the canonical arrays, recorded in manifests
    #: (channels, height, width) for image data stored flat in X; None for tabular data.
    image_shape: tuple[int, int, int] | None = None
    #: Whether every feature is 0/1 (Location, Purchase, Texas): label-only attacks flip bits.
    binary: bool = False

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

    def save(self, path: Path) -> None:
        """The split's indices as an .npz (shipped in the bundle, so an audit can rebuild its sets)."""
        with Path(path).open("wb") as f:
            np.savez(f, **self.parts)  # type: ignore[arg-type]  # numpy stubs read **kwds as allow_pickle

    @classmethod
    def load(cls, path: Path) -> Split:
        """A split saved with ``save`` (or any .npz of role -> row indices), checked to be disjoint."""
        with np.load(path) as f:
            split = cls(Path(path).name, None, {k: f[k].astype(np.int64) for k in f.files})
        split.check_disjoint()
        return split

    def check_disjoint(self) -> None:
        seen: set[int] = set()
        for role, idx in self.parts.items():
            s = set(idx.tolist())
            if len(s) != idx.size or seen & s:
                raise ValueError(f"split {self.name!r}: part {role!r} overlaps another part or repeats rows")
            seen |= s


Loader = Callable[[Path | None], Dataset]
#: name -> loader(path) -> Dataset; the CLI's ``--dataset`` choices.
DATASETS = Registry("dataset")


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    return DATASETS.function(name)


def available_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(name: str, path: Path | None = None) -> Dataset:
    loader: Loader = DATASETS.get(name)
    return loader(path)


def _finish(name: str, X: np.ndarray, y: np.ndarray, *, labels_from_one: bool = False, **kw: object) -> Dataset:
    """Validate and canonicalise loaded arrays: float32 [N, D], int64 labels 0..C-1."""
    X = np.ascontiguousarray(X, dtype=np.float32).reshape(len(X), -1)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if labels_from_one:
        y = y - 1
    if len(X) != len(y):
        raise ValueError(f"{name}: {len(X)} feature rows but {len(y)} labels")
    if len(y) == 0 or y.min() < 0:
        raise ValueError(f"{name}: labels must be 0..C-1 (or 1..C for formats that count from 1)")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: features contain NaN or infinity")
    binary = bool(np.isin(X, (0.0, 1.0)).all())
    return Dataset(name, X, y, int(y.max()) + 1, _digest(X, y), binary=binary, **kw)  # type: ignore[arg-type]


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
    return _finish("location30", X, y)


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """features/labels or X/Y (or x/y) arrays from an .npz, as redistributed copies name them."""
    with np.load(path, allow_pickle=False) as d:
        for fx, fy in (("features", "labels"), ("X", "Y"), ("x", "y"), ("X", "y")):
            if fx in d.files and fy in d.files:
                return d[fx], d[fy]
        raise ValueError(f"{path}: expected arrays features/labels or X/Y, found {d.files}")


def _counts_from_one(y: np.ndarray, classes: int) -> bool:
    """Redistributed .npz copies use 0..C-1 or the original 1..C: 1-based iff no 0 and C appears."""
    return bool(np.min(y) >= 1 and np.max(y) == classes)


def _text_rows(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)


@register_dataset("purchase100")
def load_purchase100(path: Path | None = None) -> Dataset:
    """Purchase100 (Shokri et al.): ``dataset_purchase`` text (``label,f1..f600``, labels 1..100) or an .npz."""
    path = _required(path, "purchase100", "the dataset_purchase file (privacytrustlab/datasets) or an .npz")
    if path.is_dir():
        path = path / "dataset_purchase"
    if path.suffix == ".npz":
        X, y = _npz_arrays(path)
        return _finish("purchase100", X, y, labels_from_one=_counts_from_one(y, 100))
    rows = _text_rows(path)
    return _finish("purchase100", rows[:, 1:], rows[:, 0], labels_from_one=True)


@register_dataset("texas100")
def load_texas100(path: Path | None = None) -> Dataset:
    """Texas100: a directory with ``feats`` (comma-separated 0/1) and ``labels`` (1..100), or an .npz."""
    path = _required(path, "texas100", "a directory holding texas/100/feats and labels, or an .npz")
    if path.suffix == ".npz":
        X, y = _npz_arrays(path)
        return _finish("texas100", X, y, labels_from_one=_counts_from_one(y, 100))
    for base in (path, path / "texas" / "100"):
        if (base / "feats").is_file() and (base / "labels").is_file():
            X = _text_rows(base / "feats")
            y = np.loadtxt(base / "labels", dtype=np.int64, ndmin=1)
            return _finish("texas100", X, y, labels_from_one=True)
    raise ValueError(f"{path}: no feats and labels files found")


def _unpickle(path: Path) -> dict[bytes, object]:
    import pickle

    with path.open("rb") as f:
        # Pickles can run code: load only the user's own CIFAR files, as the format requires.
        return pickle.load(f, encoding="bytes")


def _load_cifar(path: Path | None, name: str, files: tuple[str, ...], label_key: bytes) -> Dataset:
    path = _required(path, name, "the extracted python-version directory")
    X, y = [], []
    for f in files:
        batch = _unpickle(path / f)
        X.append(np.asarray(batch[b"data"], dtype=np.uint8))
        y.append(np.asarray(batch[label_key]))
    data = np.concatenate(X).astype(np.float32) / 255.0  # [N, 3072] channel-major, as stored
    return _finish(name, data, np.concatenate(y), image_shape=(3, 32, 32))


@register_dataset("cifar10")
def load_cifar10(path: Path | None = None) -> Dataset:
    """CIFAR-10 python pickles: ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``."""
    files = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
    return _load_cifar(path, "cifar10", files, b"labels")


@register_dataset("cifar100")
def load_cifar100(path: Path | None = None) -> Dataset:
    """CIFAR-100 python pickles: ``cifar-100-python/train`` and ``test`` (fine labels)."""
    return _load_cifar(path, "cifar100", ("train", "test"), b"fine_labels")


def _read_idx(path: Path) -> np.ndarray:
    import gzip

    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@register_dataset("idx")
def load_idx(path: Path | None = None) -> Dataset:
    """MNIST-style IDX files: ``*-images-idx3-ubyte[.gz]`` with ``*-labels-idx1-ubyte[.gz]`` (train and t10k joined)."""
    path = _required(path, "idx", "a directory with *-images-idx3-ubyte[.gz] and *-labels-idx1-ubyte[.gz]")
    return _idx_dataset(path, path.name or "idx")


#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@register_dataset("fashion_mnist")
def load_fashion_mnist(path: Path | None = None) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017; 70,000 28×28 grey images, 10 classes) from its IDX files: ``--data DIR``,
    else Debian's package (``apt-get install dataset-fashion-mnist``)."""
    path = Path(path) if path is not None else FASHION_MNIST_DIR
    if not path.is_dir():
        raise ValueError(f"{path} does not exist: apt-get install dataset-fashion-mnist, or pass --data DIR with "
                         "the four *-idx?-ubyte.gz files")  # fmt: skip
    return _idx_dataset(path, "fashion_mnist")


def _idx_dataset(path: Path, name: str) -> Dataset:
    images = sorted(p for p in path.iterdir() if "-images-idx3-ubyte" in p.name)
    if not images:
        raise ValueError(f"{path}: no *-images-idx3-ubyte[.gz] files")
    X, y = [], []
    for img in images:
        lab = path / img.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte")
        if not lab.is_file():
            raise ValueError(f"{img.name} has no matching labels file {lab.name}")
        X.append(_read_idx(img))
        y.append(_read_idx(lab))
    data = np.concatenate(X)  # [N, H, W]
    h, w = data.shape[1:]
    return _finish(name, data.reshape(len(data), -1).astype(np.float32) / 255.0, np.concatenate(y),
                   image_shape=(1, h, w))  # fmt: skip


@register_dataset("tabular")
def load_tabular(path: Path | None = None) -> Dataset:
    """A user's own tabular data: an .npz (features/labels or X/Y) or a CSV whose ``label`` column
    (or, without a header, last column) holds labels 0..C-1; every other column is a feature."""
    path = _required(path, "tabular", "an .npz or .csv file")
    if path.suffix == ".npz":
        X, y = _npz_arrays(path)
        return _finish(path.stem, X, y)
    first = path.read_text().splitlines()[0].split(",")
    try:
        [float(v) for v in first]
        rows = _text_rows(path)
        return _finish(path.stem, rows[:, :-1], rows[:, -1])
    except ValueError:
        header = [h.strip() for h in first]
        if "label" not in header:
            raise ValueError(f"{path}: the CSV header has no `label` column") from None
        rows = np.loadtxt(path, delimiter=",", dtype=np.float32, skiprows=1, ndmin=2)
        col = header.index("label")
        return _finish(path.stem, np.delete(rows, col, axis=1), rows[:, col])


def _required(path: Path | None, name: str, what: str) -> Path:
    if path is None:
        raise ValueError(f"dataset {name!r} is not bundled: pass --data PATH ({what})")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist ({name}: {what})")
    return path


#: Default sizes of a seeded random split, as fractions of the dataset (MemGuard's proportions on
#: Location30: 1000/1000/1000/500/500 of 5010).
DEFAULT_FRACTIONS = {
    "target_train": 0.2,
    "target_test": 0.2,
    "eval_nonmember": 0.2,
    "shadow_in": 0.1,
    "shadow_out": 0.1,
    "validation": 0.1,
}


#: Named datasets whose seeded split has fixed role sizes (the papers' regime: 10,000 training records), in
#: Location30's proportions (2:2:2:1:1:1). A smaller copy (e.g. the tests' synthetic files) uses the fractions.
ROLE_SIZES = {
    "fashion_mnist": {"target_train": 10_000, "target_test": 10_000, "eval_nonmember": 10_000,
                      "shadow_in": 5_000, "shadow_out": 5_000, "validation": 5_000},
}  # fmt: skip


def random_split(n_rows: int, seed: int, sizes: dict[str, int] | None = None) -> Split:
    """Disjoint parts of a seeded permutation; sizes default to ``DEFAULT_FRACTIONS`` of n_rows."""
    sizes = sizes or {k: int(f * n_rows) for k, f in DEFAULT_FRACTIONS.items()}
    if sum(sizes.values()) > n_rows:
        raise ValueError(f"split sizes {sizes} need {sum(sizes.values())} rows, the dataset has {n_rows}")
    perm = np.random.default_rng(seed).permutation(n_rows)
    parts, start = {}, 0
    for role, size in sizes.items():
        parts[role] = perm[start : start + size].astype(np.int64)
        start += size
    split = Split("random", seed, parts)
    split.check_disjoint()
    return split


def make_split(data: Dataset, name: str | None, seed: int) -> Split:
    """``memguard`` (Location30's published split) or ``random`` (seeded); None picks memguard for
    Location30 and random otherwise."""
    if name is None:
        name = "memguard" if data.name == "location30" else "random"
    if name == "memguard":
        if data.name != "location30":
            raise ValueError("the memguard split exists for location30 only; use --split random")
        return memguard_split(len(data.y))
    if name == "random":
        sizes = ROLE_SIZES.get(data.name)
        return random_split(len(data.y), seed, sizes if sizes and sum(sizes.values()) <= len(data.y) else None)
    raise ValueError(f"unknown split {name!r}; choose memguard or random")


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
            "validation": idx[4500:5010],  # spare in MemGuard; checkpoint selection [choice]
        },
    )
    split.check_disjoint()
    return split
