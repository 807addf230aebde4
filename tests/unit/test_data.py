"""Dataset loaders on small synthetic files written in each real format; splits."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from defense_models.training.data import available_datasets, load_dataset, make_split, memguard_split, random_split

RNG = np.random.default_rng(0)


def test_location30_is_bundled_and_matches_its_readme() -> None:
    d = load_dataset("location30")
    assert d.X.shape == (5010, 446) and d.classes == 30 and d.binary
    assert abs(d.X.mean() - 0.120) < 0.001
    assert np.bincount(d.y).tolist()[:5] == [169, 178, 147, 155, 97]


def test_memguard_split_is_the_published_one() -> None:
    split = memguard_split()
    assert split.sizes() == {
        "target_train": 1000,
        "target_test": 1000,
        "eval_nonmember": 1000,
        "shadow_in": 500,
        "shadow_out": 500,
        "validation": 510,
    }
    d = load_dataset("location30")
    for role in ("target_train", "target_test", "eval_nonmember"):
        assert len(np.unique(d.y[split.parts[role]])) == 30  # all classes in every used range


def test_random_splits_are_disjoint_and_reproducible() -> None:
    a, b, c = random_split(1000, 7), random_split(1000, 7), random_split(1000, 8)
    assert all(np.array_equal(a.parts[k], b.parts[k]) for k in a.parts)
    assert not np.array_equal(a.parts["target_train"], c.parts["target_train"])
    seen = np.concatenate(list(a.parts.values()))
    assert len(seen) == len(np.unique(seen)) and seen.max() < 1000
    with pytest.raises(ValueError, match="need"):
        random_split(10, 0, {"target_train": 8, "target_test": 8})


def test_split_names(tmp_path: Path) -> None:
    d = load_dataset("location30")
    assert make_split(d, "memguard", 0).name == "memguard"
    split = make_split(d, "random", 3)
    split.save(tmp_path / "split.npz")
    with np.load(tmp_path / "split.npz") as f:
        assert np.array_equal(f["shadow_in"], split.parts["shadow_in"])
    with pytest.raises(ValueError, match="memguard or random"):
        make_split(d, "other", 0)


def binary_rows(n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    y = RNG.integers(1, 101, size=n)
    y[:2] = (1, 100)  # labels 1..100, as in the originals
    return (RNG.random((n, width)) < 0.2).astype(np.int64), y


def test_purchase100_text_and_npz(tmp_path: Path) -> None:
    X, y = binary_rows(30, 600)
    path = tmp_path / "dataset_purchase"
    path.write_text("\n".join(",".join(map(str, [lab, *row])) for lab, row in zip(y, X, strict=True)) + "\n")
    d = load_dataset("purchase100", path)
    assert d.X.shape == (30, 600) and np.array_equal(d.y, y - 1) and d.binary
    assert load_dataset("purchase100", tmp_path).sha256 == d.sha256  # the directory holding it
    np.savez(tmp_path / "purchase.npz", features=X, labels=y - 1)
    assert np.array_equal(load_dataset("purchase100", tmp_path / "purchase.npz").y, y - 1)


def test_texas100_feats_and_labels(tmp_path: Path) -> None:
    X, y = binary_rows(20, 6169)
    base = tmp_path / "texas" / "100"
    base.mkdir(parents=True)
    np.savetxt(base / "feats", X, fmt="%d", delimiter=",")
    np.savetxt(base / "labels", y, fmt="%d")
    d = load_dataset("texas100", tmp_path)
    assert d.X.shape == (20, 6169) and np.array_equal(d.y, y - 1)
    np.savez(tmp_path / "t.npz", X=X, Y=y)
    assert np.array_equal(load_dataset("texas100", tmp_path / "t.npz").y, y - 1)


def test_cifar_pickles(tmp_path: Path) -> None:
    for name, files, key in (
        ("cifar10", [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"], b"labels"),
        ("cifar100", ["train", "test"], b"fine_labels"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            batch = {b"data": RNG.integers(0, 256, (4, 3072), dtype=np.uint8), key: RNG.integers(0, 10, 4).tolist()}
            (folder / f).write_bytes(pickle.dumps(batch))
        d = load_dataset(name, folder)
        assert d.X.shape == (4 * len(files), 3072) and d.image_shape == (3, 32, 32)
        assert 0 <= d.X.min() and d.X.max() <= 1 and not d.binary


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_images(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", RNG.integers(0, 256, (6, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", RNG.integers(0, 10, 6))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", RNG.integers(0, 256, (3, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 0, 1]))
    d = load_dataset("idx", tmp_path)
    assert d.X.shape == (9, 784) and d.image_shape == (1, 28, 28)
    assert d.y[:3].tolist() == [9, 0, 1]  # files in name order: t10k before train
    assert 0 <= d.X.min() and d.X.max() <= 1


def test_tabular_npz_and_csv(tmp_path: Path) -> None:
    X, y = RNG.normal(size=(12, 5)), RNG.integers(0, 3, 12)
    np.savez(tmp_path / "mine.npz", X=X, y=y)
    d = load_dataset("tabular", tmp_path / "mine.npz")
    assert d.X.shape == (12, 5) and d.name == "mine" and not d.binary
    rows = np.column_stack([X, y])
    np.savetxt(tmp_path / "plain.csv", rows, delimiter=",")
    assert np.array_equal(load_dataset("tabular", tmp_path / "plain.csv").y, y)
    header = "a,label,b,c,d,e"
    np.savetxt(
        tmp_path / "named.csv", np.column_stack([X[:, :1], y, X[:, 1:]]), delimiter=",", header=header, comments=""
    )
    named = load_dataset("tabular", tmp_path / "named.csv")
    np.testing.assert_allclose(named.X, X.astype(np.float32), rtol=1e-6)


def test_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not bundled: pass --data"):
        load_dataset("purchase100")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope")
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="features/labels or X/Y"):
        load_dataset("tabular", tmp_path / "bad.npz")
    assert {"location30", "purchase100", "texas100", "cifar10", "cifar100", "idx", "tabular"} <= set(
        available_datasets()
    )


def test_fashion_mnist_reads_idx_files_and_splits_in_the_papers_regime(tmp_path: Path) -> None:
    from defense_models.training.data import ROLE_SIZES, Dataset, make_split

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", RNG.integers(0, 256, (8, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", RNG.integers(0, 10, 8))
    d = load_dataset("fashion_mnist", tmp_path)
    assert d.name == "fashion_mnist" and d.X.shape == (8, 784) and d.image_shape == (1, 28, 28)
    big = Dataset(name="fashion_mnist", X=np.zeros((70_000, 1), np.float32), y=np.zeros(70_000, np.int64),
                  classes=10, sha256="x")  # fmt: skip
    split = make_split(big, None, seed=0)
    assert split.sizes() == ROLE_SIZES["fashion_mnist"] and split.sizes()["target_train"] == 10_000
    assert make_split(big, None, seed=0).parts["target_train"].tolist() == split.parts["target_train"].tolist()
    small = make_split(d, None, seed=0)  # too few rows for the named sizes: the default fractions
    assert sum(small.sizes().values()) <= 8
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", tmp_path / "missing")
