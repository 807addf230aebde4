"""Training-time defenses: each trains a replacement for the target model, served instead of it.

One registry, ``REPLACEMENTS``: name -> trainer(context, params) -> (model, record). The record goes
into the bundle's manifest (``training.replacement``). Parameters come from ``--replacement-param
KEY=VALUE`` (``TrainConfig.replacement_params``); unknown keys are refused.

* ``advreg``: adversarial regularization (Nasr et al.), see ``adv_reg.py``; ``reference_size`` uses
  only the first N reference records (Nasr Table 7's sweep); ``lam`` and ``k`` override the flags.
* ``l2``: the target recipe with an L2 penalty λ·‖w‖² on every weight (Nasr Table 6's baseline);
  implemented as the optimizer's weight decay 2λ (the gradient of λ‖w‖²).
* ``dropout``: the target recipe with dropout p after every hidden activation (ML-Leaks).
* ``stacking``: Salem et al.'s model stacking: the members split in three disjoint parts; two base
  models (the target recipe) on parts 1 and 2; a combiner (C·2 → 64 → C) on their softmax outputs
  for part 3. The served model is the whole stack.
* ``dpsgd``: DP-SGD through Opacus with a target ε (RDP accountant); the accountant's ε, δ, the
  noise multiplier and the clipping norm go into the manifest.
* ``hamp``: HAMP's training part (high-entropy soft labels + an entropy regularizer; ``soft_targets.py``),
  with the authors' Location30 settings as defaults; the best-validation epoch is kept.
* ``relaxloss``: RelaxLoss (a target loss level α; ``soft_targets.py``), on the target recipe's optimizer.
* ``selena``: SELENA's Split-AI and self-distillation (``selena.py``); ``shard=i/N`` with ``cache=DIR`` trains
  only that shard's sub-models (``PartialWork``), a run without ``shard`` finishes and distills.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from defense_models.training.adv_reg import AdvRegConfig, train_adv_reg
from defense_models.training.data import Dataset, Split
from defense_models.training.loop import FitConfig, fit, seed_everything
from defense_models.training.nets import build, mlp, predict_probs
from defense_models.training.recipes import TrainConfig, parse_shard
from defense_models.training.selena import (
    SoftCrossEntropy,
    SplitAI,
    Splits,
    capped,
    check_label_cap,
    check_temperature,
    crossover_rows,
    exclusion_map,
    fold_rows,
    held_out_relabel,
    log_odds,
    matched_temperature,
    own_teachers,
    tempered,
)
from defense_models.training.soft_targets import HampLoss, RelaxLoss
from gateway.registry import ParameterError, Registry

Pair = tuple[torch.Tensor, torch.Tensor]  # (X [N, D] float32, y [N] int64)


@dataclass(frozen=True)
class Context:
    data: Dataset
    arch: str
    fit_config: FitConfig  # the target recipe
    members: Pair
    reference: Pair  # non-members the defender may use (Nasr's reference set)
    validation: Pair
    seed: int
    progress: bool
    advreg: AdvRegConfig
    advreg_follow_recipe: bool


def role_rows(data: Dataset, split: Split, role: str) -> Pair:
    """One role of the split as (X, y) tensors."""
    idx = split.parts[role]
    return torch.from_numpy(data.X[idx]), torch.from_numpy(data.y[idx])


def replacement_context(config: TrainConfig, data: Dataset, split: Split, arch: str, fit_config: FitConfig,
                        members: Pair, seed: int) -> Context:  # fmt: skip
    """A replacement's inputs: ``members`` (the target's, or a shadow's IN half), the target's reference set
    (``target_test``, outside LiRA's pool) and validation rows."""
    return Context(data, arch, fit_config, members, role_rows(data, split, "target_test"),
                   role_rows(data, split, "validation"), seed, config.progress, config.advreg,
                   config.advreg_follow_recipe)  # fmt: skip


#: name -> trainer(context, params) -> (model, manifest record)
REPLACEMENTS = Registry("replacement")
register = REPLACEMENTS.function


def _take(params: dict[str, Any], defaults: dict[str, Any], kind: str) -> dict[str, Any]:
    if unknown := set(params) - set(defaults):
        raise ParameterError(f"--replacement {kind}: unknown parameters {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **params}


def train_replacement(kind: str, ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    trainer = REPLACEMENTS.get(kind)
    torch.manual_seed(ctx.seed)
    model, record = trainer(ctx, params)
    return model.eval(), {"kind": kind, **record}


def _plain(ctx: Context, X: torch.Tensor, y: torch.Tensor, fit_config: FitConfig, desc: str,
           model: nn.Module | None = None) -> nn.Module:  # fmt: skip
    model = model if model is not None else build(ctx.arch, ctx.data)
    fit(model, X, y, fit_config, progress=ctx.progress, desc=desc)
    return model


def advreg_setup(ctx: Context, params: dict[str, Any]) -> tuple[AdvRegConfig, Pair]:
    """The advreg trainer's resolved config and reference set (also used by ``bench/advreg_frontier.py``)."""
    p = _take(params, {"lam": ctx.advreg.lam, "k": ctx.advreg.k, "reference_size": None}, "advreg")
    adv = replace(ctx.advreg, lam=p["lam"], k=p["k"], seed=ctx.seed)
    size = p["reference_size"] or len(ctx.reference[1])
    if not 0 < size <= len(ctx.reference[1]):
        raise ParameterError(f"advreg reference_size must be in 1..{len(ctx.reference[1])}, got {size}")
    reference = (ctx.reference[0][:size], ctx.reference[1][:size])  # Nasr Table 7: the reference set's size
    f = ctx.fit_config
    if ctx.advreg_follow_recipe:  # the target recipe's optimizer; λ, k, epochs and warm-up from advreg
        milestones = (adv.epochs * 3 // 4,) if f.lr_milestones else ()
        adv = replace(adv, optimizer=f.optimizer, lr=f.lr, batch_size=f.batch_size, lr_milestones=milestones)
    return adv, reference


@register("advreg")
def _advreg(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    adv, reference = advreg_setup(ctx, params)
    model = build(ctx.arch, ctx.data)
    result = train_adv_reg(model, ctx.members, reference, ctx.validation, ctx.data.classes, adv,
                           progress=ctx.progress)  # fmt: skip
    return model, {"config": asdict(adv), "best_epoch": result.best_epoch, "reference_size": len(reference[1])}


@register("l2")
def _l2(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    p = _take(params, {"lam": 1e-3}, "l2")
    model = _plain(ctx, *ctx.members, replace(ctx.fit_config, weight_decay=2 * p["lam"]), f"target, L2 λ={p['lam']}")
    return model, {"lam": p["lam"], "weight_decay": 2 * p["lam"]}


def with_dropout(model: nn.Sequential, p: float) -> nn.Sequential:
    """The same layers with Dropout(p) after every hidden activation (identity in eval mode and ONNX)."""
    layers: list[nn.Module] = []
    children = list(model.children())
    for i, layer in enumerate(children):
        layers.append(layer)
        if isinstance(layer, nn.ReLU | nn.Tanh) and i < len(children) - 1:
            layers.append(nn.Dropout(p))
    return nn.Sequential(*layers)


@register("dropout")
def _dropout(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    p = _take(params, {"p": 0.5}, "dropout")
    model = build(ctx.arch, ctx.data)
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"dropout needs a sequential architecture, {ctx.arch} is not")
    model = _plain(ctx, *ctx.members, ctx.fit_config, f"target, dropout {p['p']}", with_dropout(model, p["p"]))
    return model, {"p": p["p"]}


class Stacked(nn.Module):
    """x -> combiner([softmax(a(x)), softmax(b(x))]) logits; exported to ONNX as one model."""

    def __init__(self, a: nn.Module, b: nn.Module, combiner: nn.Module) -> None:
        super().__init__()
        self.a, self.b, self.combiner = a, b, combiner

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.softmax(self.a(x), 1), torch.softmax(self.b(x), 1)], 1)  # [N, 2C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combiner(self.features(x))  # [N, C]


@register("stacking")
def _stacking(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    p = _take(params, {"combiner_epochs": 100}, "stacking")
    X, y = ctx.members
    order = torch.from_numpy(np.random.default_rng(ctx.seed).permutation(len(y)))
    parts = torch.tensor_split(order, 3)  # three disjoint parts of the members
    a = _plain(ctx, X[parts[0]], y[parts[0]], ctx.fit_config, "stacking base A")
    b = _plain(ctx, X[parts[1]], y[parts[1]], ctx.fit_config, "stacking base B")
    stacked = Stacked(a.eval(), b.eval(), mlp(2 * ctx.data.classes, (64,), ctx.data.classes))
    with torch.no_grad():
        feats = stacked.features(X[parts[2]])
    fit(stacked.combiner, feats, y[parts[2]], FitConfig(epochs=p["combiner_epochs"], lr=1e-3, seed=ctx.seed),
        progress=ctx.progress, desc="stacking combiner")  # fmt: skip
    return stacked, {"parts": [len(t) for t in parts], "combiner_epochs": p["combiner_epochs"]}


@register("hamp")
def _hamp(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """[defaults: the authors' Location30 run: Tanh MLP 1024-512-256-128, γ = 0.5, α = 0.001 with the KL averaged
    over batch × classes, SGD lr 0.5 momentum 0.99 weight decay 1e-5, batch 64, 100 epochs, lr × 0.1 at 60 and
    90; the best-validation epoch is kept]"""
    p = _take(params, {"gamma": 0.5, "alpha": 0.001, "kl_reduction": "elements", "arch": "purchase-mlp", "lr": 0.5,
                       "momentum": 0.99, "weight_decay": 1e-5, "batch_size": 64, "epochs": 100,
                       "milestones": "60,90"}, "hamp")  # fmt: skip
    loss = HampLoss(ctx.data.classes, p["gamma"], p["alpha"], p["kl_reduction"])
    milestones = tuple(int(m) for m in str(p["milestones"]).split(",") if m)
    config = FitConfig(epochs=int(p["epochs"]), batch_size=int(p["batch_size"]), lr=p["lr"], optimizer="sgd",
                       momentum=p["momentum"], weight_decay=p["weight_decay"], lr_milestones=milestones,
                       patience=int(p["epochs"]), seed=ctx.seed)  # fmt: skip
    model = build(p["arch"], ctx.data)
    result = fit(model, *ctx.members, config, loss_fn=loss, val=ctx.validation, progress=ctx.progress,
                 desc=f"HAMP γ={p['gamma']} α={p['alpha']}")  # fmt: skip
    best = int(np.argmax(result.val_acc)) if result.val_acc else None
    return model, {**p, "true_class_probability": loss.p, "best_epoch": best}


@register("relaxloss")
def _relaxloss(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """[defaults: α = 1 (the loss level; the authors tune it per dataset), no cap on the flattened target,
    the target recipe's optimizer and epochs]"""
    p = _take(params, {"alpha": 1.0, "upper": 1.0, "epochs": ctx.fit_config.epochs}, "relaxloss")
    loss = RelaxLoss(ctx.data.classes, p["alpha"], p["upper"])
    config = replace(ctx.fit_config, epochs=int(p["epochs"]), patience=0)

    def next_epoch(epoch: int, model: nn.Module) -> None:
        loss.epoch = epoch + 1

    model = build(ctx.arch, ctx.data)
    fit(model, *ctx.members, config, loss_fn=loss, progress=ctx.progress, desc=f"RelaxLoss α={p['alpha']}",
        on_epoch=next_epoch)  # fmt: skip
    return model, p


class PartialWork(Exception):
    """A sharded run did its share (e.g. SELENA's sub-models of one shard); nothing to export yet."""


@register("selena")
def _selena(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """[defaults: the paper's K = 25, L = 10, one map (``splits`` S > 1 averages S maps' labels, ``Splits``:
    S = 2 gives every record 20 teachers of 50 and reuses map 0's cache); every sub-model on the target recipe
    (``sub_epochs`` shortens it: 25 of them dominate on Fashion-MNIST's CNN); the distillation as in the authors'
    code (Adam 1e-3, batch 512, 60 epochs, no weight decay, the last epoch kept: they keep the best test epoch,
    which an audit must not);
    ``distill_on`` members (the paper), reference (the reference set, labelled by all K: the served model never
    sees a member) or both; ``distill_weight_decay`` regularises the distillation (Adam's L2);
    ``distill_temperature`` T > 1 flattens every soft label (softmax(log p / T)), so a row the model was
    distilled on is less confident than the teacher ensemble; ``relabel_folds`` F ≥ 2 first distills F students,
    each without one fold of the members, and gives each member the output of the student that never saw it
    (``held_out_relabel``), or with ``relabel_by`` selena (selena_reference) the output of a whole SELENA on
    the other folds (and the reference rows), so no teacher behind a member's label saw it (``_held_out_selena``);
    ``reference_teachers`` all (every sub-model labels a reference row), L (L of them,
    drawn per row and seeded, so a reference row's label is as noisy as a member's) or own (the reference set's
    own Split-AI, ``own_teachers``: no member in any reference label's teachers; ``reference_cache`` keeps its
    sub-models, default CACHE/reference_teachers, and may be shared with every LiRA reference); ``label_cap`` c
    in [0.5, 1] lowers every soft label's top probability above c to c (``capped``); ``distill_synthetic`` N adds
    N crossovers of reference rows (``crossover_rows``), labelled as the reference rows are]"""
    p = _selena_params(ctx, params)
    X, y = ctx.members
    if p["relabel_by"] != "student":
        return _held_out_selena(ctx, p, X, y)
    split_ai = _splits(ctx, p)
    if p["shard"]:
        _selena_shard(split_ai, p, ctx)
    Xd, soft = _distillation_set(split_ai, p, ctx, X, y)  # [M, D], [M, C]
    model = _selena_distill(ctx, p, Xd, soft, members=len(y))
    return model, _selena_record(ctx, p, split_ai.digest, len(Xd), p["distill_on"] != "members")


def _splits(ctx: Context, p: dict[str, Any]) -> Splits:
    """The Split-AI maps of a SELENA on ``ctx.members`` (sub-models from ``p["cache"]`` where they are there)."""
    cache = Path(p["cache"]) if p["cache"] else None
    sub_config = replace(ctx.fit_config, epochs=int(p["sub_epochs"]))
    return Splits(ctx.arch, ctx.data, sub_config, len(ctx.members[1]), int(p["K"]), int(p["L"]), ctx.seed,
                  int(p["splits"]), cache)  # fmt: skip


def _selena_record(ctx: Context, p: dict[str, Any], digest: str, rows: int, on_reference: bool) -> dict[str, Any]:
    """The manifest's record of a SELENA: what was trained (not where: ``WHERE``), its map and rows."""
    record = {k: v for k, v in p.items() if k not in WHERE}
    return {**record, "seed": ctx.seed, "exclusion_map": digest, "distill_rows": rows,
            "trained_on_reference": on_reference, "cache": p["cache"] or None}  # fmt: skip


def _selena_params(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    p = _take(params, {"K": 25, "L": 10, "splits": 1, "cache": "", "reference_cache": "", "shard": "",
                       "sub_epochs": ctx.fit_config.epochs, "distill_optimizer": "adam", "distill_lr": 1e-3,
                       "distill_batch_size": 512, "distill_epochs": 60, "distill_weight_decay": 0.0,
                       "distill_temperature": 1.0,
                       "distill_on": "members", "relabel_folds": 0, "relabel_by": "student",
                       "reference_teachers": "all", "label_cap": 1.0, "distill_synthetic": 0,
                       "pipeline_label": "distilled", "match_rounds": 1, "students": 1}, "selena")  # fmt: skip
    if p["distill_on"] not in DISTILL_ON:
        raise ParameterError(f"--replacement selena: distill_on must be one of {DISTILL_ON}, got {p['distill_on']!r}")
    if p["reference_teachers"] not in ("all", "L", "own"):
        raise ParameterError("--replacement selena: reference_teachers must be all, L or own, got "
                         f"{p['reference_teachers']!r}")  # fmt: skip
    # the label transforms' own checks, run before any sub-model trains rather than after
    exclusion_map(1, int(p["K"]), int(p["L"]), ctx.seed)  # 0 < L < K
    if int(p["splits"]) < 1:
        raise ParameterError(f"--replacement selena: splits must be >= 1, got {p['splits']}")
    check_temperature(float(p["distill_temperature"]))
    check_label_cap(float(p["label_cap"]))
    if int(p["relabel_folds"]):
        fold_rows(len(ctx.members[1]), int(p["relabel_folds"]), ctx.seed)
    if int(p["distill_synthetic"]) < 0:
        raise ParameterError(f"--replacement selena: distill_synthetic must be >= 0, got {p['distill_synthetic']}")
    if int(p["distill_synthetic"]) and p["distill_on"] == "members":
        raise ParameterError("--replacement selena: distill_synthetic extends the reference rows; distill_on=members "
                         "has none")
    if p["reference_teachers"] != "all" and p["distill_on"] == "members":
        raise ParameterError(f"--replacement selena: reference_teachers={p['reference_teachers']} labels the reference "
                         "rows; distill_on=members has none")  # fmt: skip
    if p["relabel_by"] not in RELABEL_BY:
        raise ParameterError(f"--replacement selena: relabel_by must be one of {RELABEL_BY}, got {p['relabel_by']!r}")
    if p["relabel_by"] != "student" and not int(p["relabel_folds"]):
        raise ParameterError(f"--replacement selena: relabel_by={p['relabel_by']} needs relabel_folds=F (F >= 2)")
    if p["relabel_by"] != "student" and (int(p["distill_synthetic"]) or p["reference_teachers"] != "all"):
        raise ParameterError(f"--replacement selena: relabel_by={p['relabel_by']} labels the reference rows with its "
                             "pipelines: no distill_synthetic, reference_teachers=all")  # fmt: skip
    if p["pipeline_label"] not in PIPELINE_LABEL:
        raise ParameterError(f"--replacement selena: pipeline_label must be one of {PIPELINE_LABEL}, got "
                             f"{p['pipeline_label']!r}")  # fmt: skip
    if p["pipeline_label"] != "distilled" and p["relabel_by"] == "student":
        raise ParameterError(f"--replacement selena: pipeline_label={p['pipeline_label']} labels members with a fold "
                             "pipeline: it needs relabel_by=selena or selena_reference")  # fmt: skip
    if int(p["students"]) < 1 or (int(p["students"]) > 1 and (p["relabel_by"] == "student"
                                                             or p["pipeline_label"] not in DISTILLED)):
        raise ParameterError("--replacement selena: students S >= 1 distilled models per fold pipeline, more than "
                             "one only with relabel_by=selena or selena_reference and pipeline_label=distilled or "
                             "matched_distilled")  # fmt: skip
    if int(p["match_rounds"]) < 1:
        raise ParameterError(f"--replacement selena: match_rounds must be >= 1, got {p['match_rounds']}")
    if int(p["relabel_folds"]) and p["distill_on"] == "reference":
        raise ParameterError("--replacement selena: relabel_folds relabels members; distill_on=reference has none")
    return p


def _fold_pipelines(ctx: Context, p: dict[str, Any], X: torch.Tensor,
                    y: torch.Tensor) -> list[tuple[torch.Tensor, Context, dict[str, Any]]]:  # fmt: skip
    """``relabel_by=selena``: for fold f of the members, (its rows, a context whose members are every other
    fold's, the parameters of a whole SELENA on them: its own sub-models in CACHE/fold_f, seeds of its own).
    ``selena_reference``: the reference rows join each pipeline's members (its sub-models train on them too)."""
    pipelines = []
    with_reference = p["relabel_by"] == "selena_reference"
    for f, rows in enumerate(fold_rows(len(y), int(p["relabel_folds"]), ctx.seed)):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[rows] = False
        own = (torch.cat([X[keep], ctx.reference[0]]), torch.cat([y[keep], ctx.reference[1]])) if with_reference \
            else (X[keep], y[keep])  # fmt: skip
        sub = replace(ctx, members=own, seed=ctx.seed + 1 + f,
                      fit_config=replace(ctx.fit_config, seed=ctx.fit_config.seed + FOLD_SEED * (f + 1)))
        sub_p = {**p, "relabel_folds": 0, "relabel_by": "student", "pipeline_label": "distilled", "students": 1,
                 "distill_on": "members" if with_reference else p["distill_on"],
                 "cache": str(Path(p["cache"]) / f"fold_{f}") if p["cache"] else ""}
        pipelines.append((rows, sub, sub_p))
    return pipelines


def _held_out_selena(ctx: Context, p: dict[str, Any], X: torch.Tensor,
                     y: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """``relabel_by=selena``: F whole SELENA pipelines, pipeline f on every fold but f (its sub-models and its
    reference labels from those members only). A member's label is the output of the pipeline that never saw
    it, even through a teacher: a draw of the function LiRA's OUT references are. Each reference row's (with
    ``distill_on=both``) is the mean of the F pipelines' outputs. The served model distills on them.
    ``selena_reference``: each pipeline's Split-AI and distillation also cover the reference rows."""
    pipelines = _fold_pipelines(ctx, p, X, y)
    if p["shard"]:  # every pipeline's share of its sub-models (each pipeline's own run ends in PartialWork)
        for _, sub, sub_p in pipelines:
            with contextlib.suppress(PartialWork):
                _selena(sub, sub_p)
        raise PartialWork(f"SELENA sub-models of shard {p['shard']} of every fold are in {p['cache']}; once every "
                          "shard is done, run again without shard= to distill and export")  # fmt: skip
    both = p["distill_on"] == "both"
    Xd = torch.cat([X, ctx.reference[0]]) if both else X  # [M, D]: the members, then the reference rows
    matched = p["pipeline_label"] in MATCHED
    soft = torch.zeros(len(Xd), ctx.data.classes)  # [M, C]
    digests, validation = [], []
    for rows, sub, sub_p in pipelines:
        labels = _pipeline_labels(sub, sub_p, p, X[rows], Xd[len(y):] if both else None,
                                  ctx.validation[0] if matched else None)  # fmt: skip
        soft[rows] = labels.fold
        if labels.reference is not None:
            soft[len(y):] += labels.reference / len(pipelines)
        digests.append(labels.digest)
        validation.append(labels.validation)
    extra: dict[str, Any] = {}
    if matched:
        soft, rounds = _matched(ctx, p, Xd, soft, [rows for rows, _, _ in pipelines], validation)
        extra = {"label_temperatures": rounds[-1], "label_temperature_rounds": rounds}
    model = _selena_distill(ctx, {**p, "relabel_folds": 0}, Xd, soft, members=len(y))
    on_reference = both or p["relabel_by"] == "selena_reference"
    return model, {**_selena_record(ctx, p, ",".join(digests), len(Xd), on_reference), **extra}


def _matched(ctx: Context, p: dict[str, Any], Xd: torch.Tensor, soft: torch.Tensor, folds: list[torch.Tensor],
             validation: list[torch.Tensor | None]) -> tuple[torch.Tensor, list[list[float]]]:  # fmt: skip
    """``pipeline_label=matched_teachers`` (``matched_distilled``): soft [M, C] with fold f's member labels tempered
    (T_f) so that the mean log-odds of pipeline f's teachers (its students) on the validation rows (``validation[f]``
    [V, C]) equals that of the served model there: a member's label is then as confident as what the served model says
    about a record it never saw, which is what LiRA's OUT references say about it. Flatter labels make a flatter served
    model, so ``match_rounds`` R distills R times, each time on the last round's labels (the first on the teachers'
    own), and fits the T_f to it. Returns the labels and every round's temperatures."""
    X_val, y_val = ctx.validation
    current, rounds = soft, []
    for _ in range(int(p["match_rounds"])):
        served = _selena_distill(ctx, {**p, "relabel_folds": 0}, Xd, current, members=int(sum(map(len, folds))))
        target = float(log_odds(predict_probs(served, X_val).float(), y_val).mean())
        temperatures = [matched_temperature(v, y_val, target) for v in validation if v is not None]
        current = soft.clone()
        for rows, t in zip(folds, temperatures, strict=True):
            current[rows] = tempered(soft[rows], t)
        rounds.append(temperatures)
    return current, rounds


class PipelineLabels(NamedTuple):
    """A fold pipeline's labels: its fold's members [n, C], the reference rows [R, C] (None: not distilled on),
    the validation rows [V, C] (None: not asked), and its maps' digest."""

    fold: torch.Tensor
    reference: torch.Tensor | None
    validation: torch.Tensor | None
    digest: str


def _pipeline_labels(sub: Context, sub_p: dict[str, Any], p: dict[str, Any], X_fold: torch.Tensor,
                     X_ref: torch.Tensor | None, X_val: torch.Tensor | None) -> PipelineLabels:  # fmt: skip
    """Fold pipeline ``sub``'s labels for the members it never saw (X_fold [n, D]), the reference rows (X_ref [R, D])
    and the validation rows (X_val [V, D], only when matched). ``pipeline_label=distilled`` (and ``matched_distilled``):
    the mean softmax of its ``students`` distilled models; ``teachers`` (and ``matched_teachers``): the mean softmax of
    all K of its sub-models for X_fold and X_val, and for a reference row what its own SELENA would label it with
    (``selena_reference``: the L sub-models that left it out; ``selena``: all K, as ``reference_teachers=all``). No
    pipeline is distilled then."""
    if p["pipeline_label"] in DISTILLED:
        models, digest = _students(sub, sub_p, int(p["students"]))

        def mean(rows: torch.Tensor) -> torch.Tensor:  # [r, D] -> [r, C]
            return torch.stack([predict_probs(m, rows).float() for m in models]).mean(0)

        return PipelineLabels(mean(X_fold), None if X_ref is None else mean(X_ref),
                              None if X_val is None else mean(X_val), digest)  # fmt: skip
    split_ai = _splits(sub, sub_p)
    own = p["relabel_by"] == "selena_reference"  # the reference rows are this pipeline's records
    none = X_fold[:0]  # [0, D]: a part not asked for
    parts = [X_fold, none if X_ref is None or own else X_ref, none if X_val is None else X_val]
    records_soft, others_soft = split_ai.soft_labels(*sub.members, sub.progress, torch.cat(parts))
    assert others_soft is not None
    fold, reference, validation = others_soft.split([len(x) for x in parts])  # [n, C], [R or 0, C], [V or 0, C]
    if X_ref is not None and own:
        reference = records_soft[-len(X_ref):]
    return PipelineLabels(fold, None if X_ref is None else reference, None if X_val is None else validation,
                          split_ai.digest)  # fmt: skip


def _students(sub: Context, sub_p: dict[str, Any], count: int) -> tuple[list[nn.Module], str]:
    """Fold pipeline ``sub``'s ``count`` distilled models on its one distillation set, student s from seed
    sub.seed + STUDENT_SEED·s (s = 0: the model ``_selena(sub, sub_p)`` distills; ``students``: their mean
    varies less than one, and is of the same kind), with its maps' digest."""
    split_ai = _splits(sub, sub_p)
    Xd, soft = _distillation_set(split_ai, sub_p, sub, *sub.members)  # [M, D], [M, C]
    models = [_selena_distill(replace(sub, seed=sub.seed + STUDENT_SEED * s), sub_p, Xd, soft, len(sub.members[1]))
              for s in range(count)]  # fmt: skip
    return models, split_ai.digest


def _selena_distill(ctx: Context, p: dict[str, Any], Xd: torch.Tensor, soft: torch.Tensor, members: int) -> nn.Module:
    """The served model, distilled on rows Xd [M, D] (the first ``members`` are members) and soft [M, C]."""
    distill = FitConfig(epochs=int(p["distill_epochs"]), batch_size=int(p["distill_batch_size"]),
                        lr=float(p["distill_lr"]), optimizer=p["distill_optimizer"],
                        weight_decay=float(p["distill_weight_decay"]), seed=ctx.seed)  # fmt: skip

    def distilled(rows: torch.Tensor, labels: torch.Tensor, seed: int, desc: str) -> nn.Module:
        torch.manual_seed(seed)  # the init does not depend on how many sub-models were trained before
        model = build(ctx.arch, ctx.data)
        fit(model, rows, labels, replace(distill, seed=seed), loss_fn=SoftCrossEntropy(), progress=ctx.progress,
            desc=desc)  # fmt: skip
        return model.eval()

    folds = int(p["relabel_folds"])
    if folds:
        soft = held_out_relabel(Xd, soft, members, folds, ctx.seed, lambda rows, labels, f: distilled(
            rows, labels, ctx.seed + 1 + f, f"SELENA student {f + 1}/{folds}"))  # fmt: skip
    soft = capped(tempered(soft, float(p["distill_temperature"])), float(p["label_cap"]))
    return distilled(Xd, soft, ctx.seed, "SELENA distillation")


DISTILL_ON = ("members", "reference", "both")
#: where a member's label comes from with ``relabel_folds``: a distilled student, or a whole SELENA without
#: its fold (``selena``; ``selena_reference``: the reference rows in that SELENA's members too)
RELABEL_BY = ("student", "selena", "selena_reference")
#: with ``relabel_by`` selena(_reference), what labels fold f's members: pipeline f's distilled model, or the
#: mean softmax of its K sub-models (``teachers``: none of them saw fold f, and their mean varies less), or either
#: tempered per fold to the served model's confidence on unseen rows (``matched_*``, ``_matched``)
PIPELINE_LABEL = ("distilled", "teachers", "matched_teachers", "matched_distilled")
DISTILLED = ("distilled", "matched_distilled")  # labels from the pipeline's distilled students
MATCHED = ("matched_teachers", "matched_distilled")
#: ``relabel_by=selena``: fold f's sub-models start from the recipe's seed + FOLD_SEED·(f + 1)
FOLD_SEED = 7_919
#: ``students``: fold pipeline f's student s ≥ 1 distills from its seed + STUDENT_SEED·s
STUDENT_SEED = 1_009
#: SELENA's parameters that say where its sub-models are kept or which share trains now, not what is trained
WHERE = ("cache", "reference_cache", "shard")


def _selena_shard(split_ai: Splits, p: dict[str, Any], ctx: Context) -> None:
    """Trains this shard's sub-models (every N-th of all maps', from the i-th) into the cache, and the reference
    set's own k ≡ i (mod N) when asked."""
    if not p["cache"]:
        raise ParameterError("--replacement selena: shard=i/N needs cache=DIR, where the shards' sub-models meet")
    i, n = parse_shard(str(p["shard"]))
    X, y = ctx.members
    for part, k in split_ai.sub_models()[i::n]:
        part.train(k, X, y, ctx.progress)
    if p["reference_teachers"] == "own" and p["distill_on"] != "members":
        teachers = _own_split(split_ai, p, ctx)
        for k in range(i, teachers.K, n):
            teachers.train(k, *ctx.reference, ctx.progress)
    raise PartialWork(f"SELENA sub-models of shard {i}/{n} are in {p['cache']}; once every shard is done, run "
                      "again without shard= to distill and export")  # fmt: skip


def _distillation_set(split_ai: Splits, p: dict[str, Any], ctx: Context, X: torch.Tensor,
                      y: torch.Tensor) -> Pair:  # fmt: skip
    """(rows [M, D], soft labels [M, C]) the served model distills on."""
    distill_on = p["distill_on"]
    if distill_on == "members":
        return X, split_ai.soft_labels(X, y, ctx.progress)[0]
    others = ctx.reference[0]
    if int(p["distill_synthetic"]):  # same-class crossovers, labelled like the reference
        others = torch.cat([others, crossover_rows(others, ctx.reference[1], int(p["distill_synthetic"]), ctx.seed)])
    if p["reference_teachers"] == "own":  # no member sub-model needed unless the members are distilled on too
        reference_soft = _own_labels(split_ai, p, ctx, others)  # [R, C]
        soft = split_ai.soft_labels(X, y, ctx.progress)[0] if distill_on == "both" else None  # [N, C]
    else:
        teachers = None  # reference_teachers=all: every sub-model labels each reference row
        if p["reference_teachers"] == "L":  # L of them, drawn per row, as for a member
            teachers = exclusion_map(len(others), int(p["K"]), int(p["L"]), ctx.seed, stream=1)
        soft, labelled = split_ai.soft_labels(X, y, ctx.progress, others, teachers)  # [N, C], [R, C]
        assert labelled is not None
        reference_soft = labelled
    if distill_on == "reference" or soft is None:
        return others, reference_soft
    return torch.cat([X, others]), torch.cat([soft, reference_soft])


def _own_labels(split_ai: Splits, p: dict[str, Any], ctx: Context, others: torch.Tensor) -> torch.Tensor:
    """Soft labels [R, C] of the reference rows and their crossovers (``others``, the reference rows first) from
    the reference set's own Split-AI: a reference row's from the L sub-models that left it out, a crossover's
    from all K. No sub-model here saw a member."""
    X_ref, y_ref = ctx.reference
    teachers = _own_split(split_ai, p, ctx)
    crossovers = others[len(y_ref):] if len(others) > len(y_ref) else None
    own, crossed = teachers.soft_labels(X_ref, y_ref, ctx.progress, crossovers)  # [R0, C], [S, C] or None
    return own if crossed is None else torch.cat([own, crossed])


def _own_split(split_ai: Splits, p: dict[str, Any], ctx: Context) -> SplitAI:
    """The reference set's own Split-AI, with the members' K, L and recipe; kept in ``reference_cache``."""
    cache = p["reference_cache"] or (str(Path(p["cache"]) / "reference_teachers") if p["cache"] else "")
    return own_teachers(split_ai.arch, ctx.data, split_ai.fit_config, len(ctx.reference[1]), int(p["K"]),
                        int(p["L"]), Path(cache) if cache else None)  # fmt: skip


@register("dpsgd")
def _dpsgd(ctx: Context, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """[choices: Opacus' RDP accountant with Poisson sampling; δ = 1e-5 (< 1/N for these sets); clip
    norm 1; Adam at the recipe's batch size, lr 1e-3 and 30 epochs, since DP noise at the plain-SGD
    recipe's lr 0.01 barely trains the MLP; every one of these is a parameter. Opacus' secure_mode
    (noise from a CSPRNG, needs torchcsprng) is off, as in research use; the manifest says so.]"""
    p = _take(params, {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0, "epochs": 30, "lr": 1e-3,
                       "batch_size": ctx.fit_config.batch_size}, "dpsgd")  # fmt: skip
    try:
        from opacus import PrivacyEngine
    except ImportError:  # pragma: no cover - the train extra installs it
        raise RuntimeError("--replacement dpsgd needs Opacus: pip install -e '.[train]'") from None
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off, and torch that its per-sample-gradient hooks fire on
        # inputs that need no gradient; both are expected here.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _dp_train(ctx, p, PrivacyEngine(accountant="rdp", secure_mode=False))


def _dp_train(ctx: Context, p: dict[str, Any], engine: Any) -> tuple[nn.Module, dict[str, Any]]:
    gen = seed_everything(ctx.seed)
    model = build(ctx.arch, ctx.data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*ctx.members), batch_size=p["batch_size"],
                                         shuffle=True, generator=gen)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=p["lr"])
    private, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=p["epsilon"],
        target_delta=p["delta"], epochs=p["epochs"], max_grad_norm=p["max_grad_norm"],
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    epochs = range(p["epochs"])
    if ctx.progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"DP-SGD ε={p['epsilon']}", leave=False)
    private.train()
    for _ in epochs:
        for xb, yb in loader:
            if len(yb) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss_fn(private(xb), yb).backward()
            optimizer.step()
    spent = float(engine.get_epsilon(p["delta"]))
    model = private._module  # the plain module, for export
    noise = float(optimizer.noise_multiplier)
    accounting = {"target_epsilon": p["epsilon"], "epsilon": spent, "noise_multiplier": noise, "accountant": "rdp",
                  "secure_mode": False}  # fmt: skip
    return model, {**p, **accounting}
