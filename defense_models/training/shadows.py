"""Shadow / reference models, trained independently by index so they scale out.

Shadow j trains with the target's recipe on a seeded random half of a pool of records (LiRA's
design: every record is IN for about half the shadows). Whether shadow j is trained depends only on
(j, seed), so ``--shard i/N`` trains the shadows j ≡ i (mod N): N workers (a Kubernetes Indexed Job
with ``--shard $JOB_COMPLETION_INDEX/N``, or any job runner) fill one directory without coordinating.

With ``TrainConfig.replacement`` set, each shadow is that training-time defense trained on its half
(``--replacement selena`` and its parameters, as ``train`` takes them): LiRA's references then copy the
defense, as the attacker who knows it would. A replacement's reference set (advreg) is the target's
(``target_test``, outside the pool), its validation set the target's; its seed is the shadow's.

Each shadow is written as ``shadow_{j:04d}.safetensors`` (weights) and ``shadow_{j:04d}.json`` (its
IN mask over the pool, accuracy, recipe, replacement). ``load_shadows`` collects whatever is there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from defense_models.training.loop import FitConfig, accuracy, fit
from defense_models.training.nets import build
from defense_models.training.recipes import TrainConfig, dataset_and_split, recipe
from defense_models.training.replacements import WHERE, Pair, replacement_context, train_replacement
from gateway.artifacts import write_text_atomically
from gateway.defenses.classifier import load_weights, save_weights
from gateway.registry import ParameterError


class ShadowRequest(BaseModel):
    """What ``shadows`` was asked to train: plain (``none``) or a replacement with its parameters (no cache)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)


class ShadowMeta(BaseModel):
    """``shadow_{j:04d}.json``: the file contract between ``shadows`` and LiRA (``audit/queries.py``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    index: int
    count: int = 0  # how many shadows were asked for across the shards (0: written before it was recorded)
    dataset: str
    dataset_sha256: str
    split: str
    seed: int
    pool_roles: list[str]
    pool_rows: list[int]  # dataset row indices
    in_mask: list[bool]  # over pool_rows: the rows this shadow trained on
    architecture: str
    fit: dict[str, Any]
    request: ShadowRequest = ShadowRequest()
    replacement: dict[str, Any] = Field(default_factory=lambda: {"kind": "none"})  # the trainer's record
    train_accuracy: float
    out_accuracy: float


#: replacement -> why ``shadows`` cannot train it (its served model is not one network ``build`` makes)
UNSHADOWABLE = {"stacking": "its served model is a stack of three networks; LiRA's references load one network"}

#: Pool for Location30 [docs/ALGORITHMS.md §5, choice]: evaluation members and non-members.
DEFAULT_POOL = ("target_train", "eval_nonmember")


@dataclass(frozen=True)
class ShadowSpec:
    count: int
    pool: tuple[str, ...] = DEFAULT_POOL
    keep: float = 0.5  # share of the pool each shadow trains on


def in_mask(j: int, pool_size: int, keep: float, seed: int) -> np.ndarray:
    """Shadow j's IN mask over the pool: a function of (j, seed) only."""
    rng = np.random.default_rng([seed, j])
    mask = np.zeros(pool_size, dtype=bool)
    mask[rng.permutation(pool_size)[: round(keep * pool_size)]] = True
    return mask


def train_shadows(config: TrainConfig, spec: ShadowSpec, out: Path, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """Train the shadows of this shard that are not already in ``out``; return their indices."""
    if config.replacement in UNSHADOWABLE:
        raise ParameterError(f"shadows --replacement {config.replacement}: {UNSHADOWABLE[config.replacement]}")
    data, split = dataset_and_split(config)
    pool = np.concatenate([split.parts[r] for r in spec.pool])  # dataset row indices
    arch, fit_config = recipe(config, data)
    X, y = torch.from_numpy(data.X[pool]), torch.from_numpy(data.y[pool])
    out.mkdir(parents=True, exist_ok=True)
    done = []
    params = {k: v for k, v in config.replacement_params.items() if k not in WHERE}  # where, not what
    request = ShadowRequest(kind=config.replacement, params=params)
    _check_same_request(out, request)
    for j in range(shard[0], spec.count, shard[1]):
        meta_path = out / f"shadow_{j:04d}.json"
        if meta_path.exists():
            continue  # idempotent: a retried shard skips finished shadows
        mask = in_mask(j, len(pool), spec.keep, config.seed)
        model, record, shadow_arch = _train_one(config, data, split, arch, fit_config, (X[mask], y[mask]), out, j)
        save_weights(model, out / f"shadow_{j:04d}.safetensors")
        meta = ShadowMeta(
            index=j, count=spec.count, dataset=data.name, dataset_sha256=data.sha256, split=split.name,
            seed=config.seed, pool_roles=list(spec.pool), pool_rows=pool.tolist(), in_mask=mask.tolist(),
            architecture=shadow_arch, fit=asdict(fit_config), request=request, replacement=record,
            train_accuracy=accuracy(model, X[mask], y[mask]), out_accuracy=accuracy(model, X[~mask], y[~mask]),
        )  # fmt: skip
        write_text_atomically(meta_path, meta.model_dump_json() + "\n")  # written last: marks the shadow complete
        done.append(j)
    return done


def _train_one(config: TrainConfig, data: Any, split: Any, arch: str, fit_config: FitConfig, members: Pair,
               out: Path, j: int) -> tuple[torch.nn.Module, dict[str, Any], str]:  # fmt: skip
    """Shadow j on its IN half with the target recipe (arch, fit_config): (model, replacement record, arch)."""
    seed = config.seed * 100_003 + j
    fit_config = replace(fit_config, seed=seed)
    torch.manual_seed(seed)
    if config.replacement == "none":
        model = build(arch, data)
        fit(model, *members, fit_config, progress=config.progress, desc=f"shadow {j}")
        return model, {"kind": "none"}, arch
    ctx = replacement_context(config, data, split, arch, fit_config, members, seed)
    model, record = train_replacement(config.replacement, ctx, _shadow_params(config, out, j))
    return model, record, record.get("arch", arch)  # HAMP trains its own network


def _check_same_request(out: Path, request: ShadowRequest) -> None:
    """One directory holds one kind of reference: shards and retries must ask for the same replacement."""
    if (first := next(iter(sorted(out.glob("shadow_*.json"))), None)) is None:
        return
    had = ShadowMeta.model_validate_json(first.read_text()).request
    if had != request:
        raise ParameterError(f"{out} holds shadows trained with {had}, not {request}: use another --out")


def _shadow_params(config: TrainConfig, out: Path, j: int) -> dict[str, Any]:
    """The replacement's parameters for shadow j: a cache directory of its own (SELENA's sub-models)."""
    params = dict(config.replacement_params)
    if params.get("shard"):
        raise ParameterError("shadows --replacement: shard= is per shadow here; scale out with --shard i/N instead")
    if params.get("cache"):
        params["cache"] = str(Path(params["cache"]) / f"shadow_{j:04d}")
    return params


def shadow_metas(directory: Path) -> list[tuple[Path, ShadowMeta]]:
    """Every complete shadow's metadata file in ``directory``, in index order (no weights loaded)."""
    return [(p, ShadowMeta.model_validate_json(p.read_text())) for p in sorted(Path(directory).glob("shadow_*.json"))]


def load_shadows(directory: Path, data: Any) -> list[tuple[torch.nn.Module, ShadowMeta]]:
    """Every complete shadow in ``directory`` as (model, metadata), in index order."""
    shadows = []
    for meta_path, meta in shadow_metas(directory):
        model = build(meta.architecture, data)
        load_weights(model, meta_path.with_suffix(".safetensors"))
        shadows.append((model, meta))
    return shadows
