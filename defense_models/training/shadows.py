"""Shadow / reference models, trained independently by index so they scale out.

Shadow j trains with the target's recipe on a seeded random half of a pool of records (LiRA's
design: every record is IN for about half the shadows). Whether shadow j is trained depends only on
(j, seed), so ``--shard i/N`` trains the shadows j ≡ i (mod N): N workers (a Kubernetes Indexed Job
with ``--shard $JOB_COMPLETION_INDEX/N``, or any job runner) fill one directory without coordinating.

Each shadow is written as ``shadow_{j:04d}.safetensors`` (weights) and ``shadow_{j:04d}.json`` (its
IN mask over the pool, accuracy, recipe). ``load_shadows`` collects whatever is there.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defense_models.training.loop import accuracy, fit
from defense_models.training.nets import build
from defense_models.training.recipes import TrainConfig, dataset_and_split, recipe
from gateway.defenses.classifier import load_weights, save_weights

#: Pool for Location30 [docs/ALGORITHMS.md §5, choice]: evaluation members and non-members.
DEFAULT_POOL = ("target_train", "eval_nonmember")


@dataclass(frozen=True)
class ShadowSpec:
    count: int
    pool: tuple[str, ...] = DEFAULT_POOL
    keep: float = 0.5  # share of the pool each shadow trains on


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < N")
    return i, n


def in_mask(j: int, pool_size: int, keep: float, seed: int) -> np.ndarray:
    """Shadow j's IN mask over the pool: a function of (j, seed) only."""
    rng = np.random.default_rng([seed, j])
    mask = np.zeros(pool_size, dtype=bool)
    mask[rng.permutation(pool_size)[: round(keep * pool_size)]] = True
    return mask


def train_shadows(config: TrainConfig, spec: ShadowSpec, out: Path, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """Train the shadows of this shard that are not already in ``out``; return their indices."""
    data, split = dataset_and_split(config)
    pool = np.concatenate([split.parts[r] for r in spec.pool])  # dataset row indices
    arch, fit_config = recipe(config, data)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for j in range(shard[0], spec.count, shard[1]):
        meta_path = out / f"shadow_{j:04d}.json"
        if meta_path.exists():
            continue  # idempotent: a retried shard skips finished shadows
        mask = in_mask(j, len(pool), spec.keep, config.seed)
        X, y = torch.from_numpy(data.X[pool]), torch.from_numpy(data.y[pool])
        torch.manual_seed(config.seed * 100_003 + j)
        model = build(arch, data)
        fit(model, X[mask], y[mask], replace(fit_config, seed=config.seed * 100_003 + j),
            progress=config.progress, desc=f"shadow {j}")  # fmt: skip
        weights = out / f"shadow_{j:04d}.safetensors"
        with tempfile.NamedTemporaryFile(dir=out, delete=False, suffix=".tmp") as tmp:
            save_weights(model, Path(tmp.name))
        Path(tmp.name).replace(weights)
        meta = {
            "index": j, "dataset": data.name, "dataset_sha256": data.sha256, "split": split.name,
            "seed": config.seed, "pool_roles": list(spec.pool), "pool_rows": pool.tolist(), "in_mask": mask.tolist(),
            "architecture": arch, "fit": asdict(fit_config),
            "train_accuracy": accuracy(model, X[mask], y[mask]), "out_accuracy": accuracy(model, X[~mask], y[~mask]),
        }  # fmt: skip
        meta_path.write_text(json.dumps(meta) + "\n")  # written last: marks the shadow complete
        done.append(j)
    return done


def load_shadows(directory: Path, data: Any) -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """Every complete shadow in ``directory`` as (model, metadata), in index order."""
    shadows = []
    for meta_path in sorted(Path(directory).glob("shadow_*.json")):
        meta = json.loads(meta_path.read_text())
        model = build(meta["architecture"], data)
        load_weights(model, meta_path.with_suffix(".safetensors"))
        shadows.append((model, meta))
    return shadows
