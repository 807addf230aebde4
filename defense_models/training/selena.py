"""SELENA (Tang et al., USENIX Security 2022): Split-AI, then self-distillation.

Split-AI: K sub-models; each training record is left out of L of them, chosen at random (seeded), and every
sub-model trains with the target recipe on the records it is not left out of. A record's soft label is the
mean softmax of the L sub-models that never saw it, so it carries no more of that record than a non-member's
would. The served model is trained with the target recipe on the training records and those soft labels
(self-distillation): one plain model, exported like any other.

The exclusion map is a function of (records, K, L, seed) only, so sub-model k can be trained anywhere:
``shard=i/N`` trains the sub-models k ≡ i (mod N) into ``cache`` (one ``selena_{k:03d}.safetensors`` each,
with a ``.json`` naming the map's digest and the epochs), and a run without ``shard`` trains what is missing
there, then distills. Sub-models already in ``cache`` for the same map and epochs are reused.

What the served model distills on (``distill_on``): the paper's ``members`` (each with its L-model soft label);
``reference``, the defender's non-member reference set labelled by all K sub-models, so the served model never
trains on a member (DMP's idea, Shejwalkar & Houmansadr, AAAI 2021, with Split-AI as the teacher); or ``both``.
The reference rows' teachers can instead be the reference set's own Split-AI (``own_teachers``): K sub-models
on the reference rows alone, none of which saw a member, so those labels carry no member at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defense_models.training.data import Dataset
from defense_models.training.loop import FitConfig, fit
from defense_models.training.nets import build, predict_probs
from gateway.artifacts import write_text_atomically
from gateway.defenses.classifier import load_weights, save_weights
from gateway.registry import ParameterError


def exclusion_map(records: int, K: int, L: int, seed: int, stream: int = 0) -> np.ndarray:
    """[records, L] the sub-models each record is left out of (distinct, seeded); ``stream`` 1 draws another
    map from the same seed (the reference rows' teachers)."""
    if not 0 < L < K:
        raise ParameterError(f"SELENA needs 0 < L < K, got K={K}, L={L}")
    rng = np.random.default_rng([seed, K, L] + ([stream] if stream else []))
    return np.argsort(rng.random((records, K)), axis=1)[:, :L]


#: the reference set's own Split-AI (``own_teachers``): its map's stream (1 is ``reference_teachers=L``) and its
#: seed, fixed, so the target and every LiRA reference that copies it share one set of teachers
OWN_STREAM, OWN_SEED = 2, 0
#: the further maps of ``splits`` S > 1: map m ≥ 1 is stream SPLIT_STREAM + m of the model's seed
SPLIT_STREAM = 10


def map_digest(excluded: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(excluded, dtype=np.int64).tobytes()).hexdigest()[:16]


def trains_on(excluded: np.ndarray, k: int) -> np.ndarray:
    """[records] bool: the records sub-model k trains on."""
    return ~(excluded == k).any(axis=1)


def check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ParameterError(f"distill_temperature must be > 0, got {temperature}")


def check_label_cap(cap: float) -> None:
    if not 0.5 <= cap <= 1:
        raise ParameterError(f"label_cap must be in [0.5, 1], got {cap}")


def tempered(soft: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft labels [M, C] -> softmax(log soft / T) [M, C]: T > 1 flattens each row, keeps its argmax and order."""
    check_temperature(temperature)
    if temperature == 1:
        return soft
    return torch.softmax(torch.log(soft.clamp_min(1e-12)) / temperature, dim=1)  # keeps soft's dtype


def log_odds(soft: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft labels [M, C], labels [M] -> [M] float64: log p_y − log(1 − p_y), the statistic LiRA compares."""
    p = soft.double().gather(1, labels[:, None])[:, 0].clamp(1e-12, 1 - 1e-12)  # [M]
    return torch.log(p) - torch.log1p(-p)


#: the temperatures ``matched_temperature`` chooses from (1 among them: 0.25 · 32^(120/300))
TEMPERATURES = np.geomspace(0.25, 8.0, 301)


def matched_temperature(soft: torch.Tensor, labels: torch.Tensor, target: float) -> float:
    """The T of ``TEMPERATURES`` whose tempered(soft, T) [M, C] has the mean log-odds on labels [M] nearest to
    ``target`` (the first of equals, so a tie keeps the smaller T)."""
    gaps = [abs(float(log_odds(tempered(soft, float(t)), labels).mean()) - target) for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(gaps))])


def fold_rows(records: int, folds: int, seed: int) -> list[torch.Tensor]:
    """The records 0..records-1 in ``folds`` disjoint parts of near-equal size (a seeded permutation)."""
    if not 2 <= folds <= records:
        raise ParameterError(f"relabel_folds must be 0 (off) or in 2..{records}, got {folds}")
    order = torch.from_numpy(np.random.default_rng([seed, folds]).permutation(records))
    return list(torch.tensor_split(order, folds))


def held_out_relabel(Xd: torch.Tensor, soft: torch.Tensor, members: int, folds: int, seed: int,
                     student: Callable[[torch.Tensor, torch.Tensor, int], nn.Module]) -> torch.Tensor:  # fmt: skip
    """Soft labels [M, C] whose first ``members`` rows are replaced fold by fold: a fold's members get the softmax
    of a student distilled on every other row of (Xd [M, D], soft), so each member's final label is what a
    distilled model that never saw it outputs there, the same kind of function LiRA's OUT references are.
    ``student(X, soft, fold)`` trains one. The other rows (the reference set) keep their labels."""
    out = soft.clone()
    for fold, rows in enumerate(fold_rows(members, folds, seed)):
        keep = torch.ones(len(Xd), dtype=torch.bool)
        keep[rows] = False
        model = student(Xd[keep], soft[keep], fold)
        out[rows] = predict_probs(model, Xd[rows]).to(soft.dtype)
    return out


def crossover_rows(X: torch.Tensor, y: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """[count, D] new rows, each feature taken from one of two rows of X [R, D] of the same class y [R] (both
    drawn at random, seeded), so a new row stays near its class's rows."""
    rng = np.random.default_rng([seed, count])
    a = rng.integers(len(X), size=count)
    labels = y.numpy()
    rows_of = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}  # class -> its rows, found once
    b = np.array([rng.choice(rows_of[labels[i]]) for i in a], dtype=np.int64)
    mask = torch.from_numpy(rng.random((count, X.shape[1])) < 0.5)  # [count, D]
    return torch.where(mask, X[a], X[b])


def capped(soft: torch.Tensor, cap: float) -> torch.Tensor:
    """Soft labels [M, C] -> each row whose largest probability exceeds ``cap`` gets exactly ``cap`` there and
    the rest rescaled to sum 1 − cap (their ratios kept). cap ≥ 0.5 keeps every argmax; 1 changes nothing."""
    check_label_cap(cap)
    top, where = soft.max(dim=1, keepdim=True)  # [M, 1] each
    over = top > cap
    rest = soft * ((1 - cap) / (1 - top).clamp_min(1e-12))  # [M, C]: the others, rescaled
    return torch.where(over, rest.scatter(1, where, cap), soft)


class SoftCrossEntropy(nn.Module):
    """logits [B, C], soft targets [B, C] -> mean over rows of −Σ target · log softmax."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class SplitAI:
    """The sub-models of one exclusion map, trained (or loaded from ``cache``) one by one."""

    def __init__(self, arch: str, data: Dataset, fit_config: FitConfig, excluded: np.ndarray, K: int,
                 cache: Path | None) -> None:  # fmt: skip
        self.arch, self.data, self.fit_config = arch, data, fit_config
        self.excluded, self.K, self.cache = excluded, K, cache
        self.digest = map_digest(excluded)

    def _paths(self, k: int) -> tuple[Path, Path]:
        assert self.cache is not None
        return self.cache / f"selena_{k:03d}.safetensors", self.cache / f"selena_{k:03d}.json"

    def cached(self, k: int) -> bool:
        if self.cache is None:
            return False
        weights, meta = self._paths(k)
        recorded = json.loads(meta.read_text()) if meta.exists() else {}
        same = recorded.get("map") == self.digest and recorded.get("epochs") == self.fit_config.epochs
        return weights.exists() and same

    def train(self, k: int, X: torch.Tensor, y: torch.Tensor, progress: bool) -> nn.Module:
        """Sub-model k on its records (from ``cache`` when it is there for this map)."""
        seed = self.fit_config.seed + 1 + k
        torch.manual_seed(seed)  # its init is its own, whichever sub-models this process trained or loaded before
        model = build(self.arch, self.data)
        if self.cached(k):
            return load_weights(model, self._paths(k)[0]).eval()
        mask = torch.from_numpy(trains_on(self.excluded, k))
        fit(model, X[mask], y[mask], replace(self.fit_config, seed=seed), progress=progress,
            desc=f"SELENA sub-model {k + 1}/{self.K}")  # fmt: skip
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)
            weights, meta = self._paths(k)
            save_weights(model, weights)
            write_text_atomically(meta, json.dumps({"k": k, "map": self.digest, "epochs": self.fit_config.epochs,
                                                    "records": int(mask.sum())}) + "\n")  # fmt: skip
        return model.eval()

    def soft_labels(self, X: torch.Tensor, y: torch.Tensor, progress: bool, others: torch.Tensor | None = None,
                    others_teachers: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Members [records, C]: each record's mean softmax over the L sub-models that left it out.
        ``others`` [M, D] (records no sub-model saw): [M, C], their mean softmax over all K sub-models, or over
        the sub-models ``others_teachers`` [M, L'] names for each row."""
        total = torch.zeros(X.shape[0], self.data.classes, dtype=torch.float64)
        rest = None if others is None else torch.zeros(others.shape[0], self.data.classes, dtype=torch.float64)
        for k in range(self.K):
            left_out = torch.from_numpy((self.excluded == k).any(axis=1))
            if not bool(left_out.any()) and rest is None:
                continue
            model = self.train(k, X, y, progress)
            total[left_out] += predict_probs(model, X[left_out])
            if rest is not None and others is not None:
                taught = slice(None) if others_teachers is None else torch.from_numpy((others_teachers == k).any(1))
                rest[taught] += predict_probs(model, others[taught])
        teachers = self.K if others_teachers is None else others_teachers.shape[1]
        return (total / self.excluded.shape[1]).float(), None if rest is None else (rest / teachers).float()


def own_teachers(arch: str, data: Dataset, fit_config: FitConfig, records: int, K: int, L: int,
                 cache: Path | None) -> SplitAI:  # fmt: skip
    """The reference set's own Split-AI over its ``records`` rows: a function of the reference rows, the recipe,
    K and L only (seed ``OWN_SEED``), never of a member, so one ``cache`` serves the target and its references."""
    excluded = exclusion_map(records, K, L, OWN_SEED, stream=OWN_STREAM)
    return SplitAI(arch, data, replace(fit_config, seed=1_000_003 + OWN_SEED), excluded, K, cache)


class Splits:
    """S independent Split-AI maps over the same records (map 0 is the paper's; map m ≥ 1 is stream
    ``SPLIT_STREAM + m``, its sub-models in ``cache/split_m``), their labels averaged with equal weights: each
    record is labelled by the S·L sub-models of S·K that never saw it (S = 2, K = 25, L = 10: 20 of 50, as
    K = 50, L = 20 would, reusing map 0's cache)."""

    def __init__(self, arch: str, data: Dataset, fit_config: FitConfig, records: int, K: int, L: int, seed: int,
                 splits: int, cache: Path | None) -> None:  # fmt: skip
        if splits < 1:
            raise ParameterError(f"splits must be >= 1, got {splits}")
        self.arch, self.fit_config = arch, fit_config
        self.parts = [self._part(data, records, K, L, seed, m, cache) for m in range(splits)]

    def _part(self, data: Dataset, records: int, K: int, L: int, seed: int, m: int, cache: Path | None) -> SplitAI:
        """Map m: map 0 exactly as without ``splits`` (its cache is reused); map m ≥ 1 with its own stream,
        sub-model seeds and cache directory."""
        excluded = exclusion_map(records, K, L, seed, stream=SPLIT_STREAM + m if m else 0)
        config = replace(self.fit_config, seed=self.fit_config.seed + 100_003 * m)
        where = cache / f"split_{m}" if cache is not None and m else cache
        return SplitAI(self.arch, data, config, excluded, K, where)

    @property
    def digest(self) -> str:
        """Map 0's digest alone (S = 1, as before ``splits``), else that of every map side by side."""
        if len(self.parts) == 1:
            return self.parts[0].digest
        return map_digest(np.concatenate([part.excluded for part in self.parts], axis=1))

    def sub_models(self) -> list[tuple[SplitAI, int]]:
        """Every (map, k), map by map: the order ``shard=i/N`` deals them out in."""
        return [(part, k) for part in self.parts for k in range(part.K)]

    def soft_labels(self, X: torch.Tensor, y: torch.Tensor, progress: bool, others: torch.Tensor | None = None,
                    others_teachers: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """``SplitAI.soft_labels`` of every map, averaged: members [records, C], others [M, C] or None."""
        labels = [part.soft_labels(X, y, progress, others, others_teachers) for part in self.parts]
        members = torch.stack([m for m, _ in labels]).mean(0)
        rest = [r for _, r in labels if r is not None]
        return members, torch.stack(rest).mean(0) if rest else None

