"""The defenders' step shared by ``train`` and ``export``: target outputs in, gated defense entries out.

1. Hold out a seeded share of the member and of the non-member rows (``holdout``).
2. Train MemGuard's g and AEPPT's substitute on the rest with the chosen recipe
   (``training.defenders.DEFENDER_RECIPES``), and calibrate AEPPT's step on the same rows.
3. Measure every defense on the held-out rows at its shipped parameters (``quality.measure``),
   refuse the weak ones unless ``allow_weak_defense``, and run the self-audit.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from defense_models.bundle import quality
from defense_models.bundle.calibrate import calibrate_aeppt_step
from defense_models.training.defenders import (
    DEFENDER_RECIPES,
    DefenderRecipe,
    holdout,
    train_memguard_classifier,
    train_substitute,
)
from gateway.artifacts import DefenseEntry, Manifest, SelfAuditRow
from gateway.defenses import Defense
from gateway.defenses.aeppt import Aeppt, AepptParams
from gateway.defenses.base import Predict
from gateway.defenses.classifier import save_weights
from gateway.defenses.memguard import MemGuard, MemGuardParams
from gateway.defenses.rank import Hamp, HampParams, RankTemplate, RankTemplateParams, build_templates
from gateway.registry import Registry

#: The ε every bundle ships MemGuard with (the largest budget of the published Location curve).
MEMGUARD_EPSILON = 1.0


@dataclass(frozen=True)
class DefenderConfig:
    defenses: tuple[str, ...] | None = None  # names in ``DEFENDERS``; None: all of them
    recipe: str = "robust"  # a key of DEFENDER_RECIPES
    #: Share of the member and of the non-member rows kept out of the classifiers' training, for the
    #: quality gate and the self-audit.
    holdout: float = 0.25
    allow_weak_defense: bool = False
    #: Which label AEPPT's substitute learns with: the record's true label, or the target's argmax,
    #: which is what it is fed at serving time [choice: argmax, so training matches serving].
    substitute_label: str = "argmax"
    seed: int = 0
    progress: bool = False

    def chosen(self) -> tuple[str, ...]:
        return tuple(DEFENDERS.names()) if self.defenses is None else self.defenses


@dataclass(frozen=True)
class TargetOutputs:
    """The target's clean probabilities [N, C] float64 and labels [N] on members and non-members."""

    p_in: torch.Tensor
    y_in: torch.Tensor
    p_out: torch.Tensor
    y_out: torch.Tensor
    true_labels: bool = True
    #: The target itself (X [B, D] -> probabilities [B, C], and D), for defenses that run it (``hamp``).
    model: tuple[Predict, int] | None = None
    #: The defender's input rows, to choose ``hamp``'s random-input distribution (``random_input_params``).
    inputs: np.ndarray | None = None


def random_input_params(X: np.ndarray | None) -> dict[str, Any]:
    """HAMP's random inputs for rows like X [N, D]: binary when every value is 0 or 1, else uniform over their range."""
    if X is None or X.size == 0 or np.isin(X, (0.0, 1.0)).all():
        return {"inputs": "binary"}
    return {"inputs": "uniform", "low": float(X.min()), "high": float(X.max())}


@dataclass(frozen=True)
class Defenders:
    files: dict[str, bytes]
    entries: dict[str, DefenseEntry]
    report: dict[str, Any]  # provenance for the manifest's ``training.defenders``
    self_audit: list[SelfAuditRow]


@dataclass(frozen=True)
class Trained:
    """One defense built on the target's outputs: served as ``defense``, its weights in the bundle."""

    defense: Defense
    weights: bytes | None
    shipped_params: dict[str, Any]  # what the bundle records (the rest take the defense's defaults)
    report: dict[str, Any]  # provenance for the manifest's ``training.defenders``


class DefenderTrainer(Protocol):
    """Trains a served defense's classifier on the target's outputs (register with ``DEFENDERS``)."""

    name: ClassVar[str]  # the gateway defense it builds
    weights_file: ClassVar[str | None]  # None: the defense ships parameters only
    #: Whether the quality gate applies (a defense with a member classifier that could be a no-op).
    gated: ClassVar[bool]

    def train(self, config: DefenderConfig, outputs: TargetOutputs, tmp: Path) -> Trained: ...


#: Defenses whose classifiers the offline job trains: the CLI's ``--defense`` choices.
DEFENDERS = Registry("defender", ())


@DEFENDERS.register
class MemGuardTrainer:
    name = "memguard"
    weights_file = "memguard_g.safetensors"
    gated = True

    def train(self, config: DefenderConfig, outputs: TargetOutputs, tmp: Path) -> Trained:
        recipe = DEFENDER_RECIPES[config.recipe].g
        g = train_memguard_classifier(outputs.p_in, outputs.p_out, _seeded(recipe, config.seed),
                                      progress=config.progress)  # fmt: skip
        save_weights(g, tmp / "g")
        params = MemGuardParams(epsilon=MEMGUARD_EPSILON)
        defense = MemGuard(g, params, torch.device("cpu"))
        shipped = {"epsilon": params.epsilon, "landing": params.landing}
        return Trained(defense, (tmp / "g").read_bytes(), shipped, {"recipe": asdict(recipe)})


@DEFENDERS.register
class AepptTrainer:
    name = "aeppt"
    weights_file = "aeppt_substitute.safetensors"
    gated = True

    def train(self, config: DefenderConfig, outputs: TargetOutputs, tmp: Path) -> Trained:
        o = outputs
        recipe = DEFENDER_RECIPES[config.recipe].substitute
        l_in, l_out = (o.y_in, o.y_out) if config.substitute_label == "true" else (o.p_in.argmax(1), o.p_out.argmax(1))
        sub = train_substitute(o.p_in, l_in, o.p_out, l_out, _seeded(recipe, config.seed), progress=config.progress)
        cal = calibrate_aeppt_step(sub, o.p_in, o.p_out)
        save_weights(sub, tmp / "s")
        calibration = {"step_size": cal.step_size, "substitute_balanced_accuracy": round(cal.balanced_accuracy, 4),
                       "mean_l1": round(cal.mean_l1, 4), "evaluations": cal.evaluations}  # fmt: skip
        params = AepptParams(step_size=cal.step_size)
        report = {"recipe": asdict(recipe) | {"label": config.substitute_label}, "calibration": calibration}
        shipped = {"step_size": params.step_size, "iterations": params.iterations}
        return Trained(Aeppt(sub, params, torch.device("cpu")), (tmp / "s").read_bytes(), shipped, report)


@DEFENDERS.register
class RankTemplateTrainer:
    name = "rank_template"
    weights_file = RankTemplate.WEIGHTS
    gated = False

    def train(self, config: DefenderConfig, outputs: TargetOutputs, tmp: Path) -> Trained:
        from safetensors.torch import save_file

        templates = build_templates(outputs.p_out)
        save_file({k: v.contiguous() for k, v in templates.items()}, str(tmp / "t"))
        defense = RankTemplate(templates, RankTemplateParams(), torch.device("cpu"))
        per_class = int((templates["per_class"] != templates["global"]).any(dim=1).sum())
        report = {"nonmember_rows": len(outputs.p_out), "classes_with_own_template": per_class}
        return Trained(defense, (tmp / "t").read_bytes(), {}, report)


@DEFENDERS.register
class HampTrainer:
    """Nothing to train: it records the random-input distribution that fits the defender's rows."""

    name = "hamp"
    weights_file = None
    gated = False

    def train(self, config: DefenderConfig, outputs: TargetOutputs, tmp: Path) -> Trained:
        params = random_input_params(outputs.inputs)
        defense = Hamp(HampParams(**params), torch.device("cpu"))
        if outputs.model is not None:
            defense.bind_model(*outputs.model)
        return Trained(defense, None, params, {"inputs": params})


def _seeded(recipe: DefenderRecipe, seed: int) -> DefenderRecipe:
    return replace(recipe, fit=replace(recipe.fit, seed=seed))


def _split(o: TargetOutputs, config: DefenderConfig) -> tuple[TargetOutputs, quality.Rows]:
    if not 0 < config.holdout <= 0.5:
        raise ValueError(f"--holdout {config.holdout}: hold out a share in (0, 0.5] of the rows for the quality gate")
    tr_in, ho_in, tr_out, ho_out = holdout(len(o.p_in), len(o.p_out), config.holdout, config.seed)
    if min(len(ho_in), len(ho_out)) < 10:
        raise ValueError(f"the quality gate needs at least 10 held-out member and non-member rows; got {len(ho_in)} "
                         f"and {len(ho_out)} (hold out more with --holdout, or bring more rows)")  # fmt: skip
    train = replace(o, p_in=o.p_in[tr_in], y_in=o.y_in[tr_in], p_out=o.p_out[tr_out], y_out=o.y_out[tr_out])
    return train, quality.Rows.of(o, ho_in, ho_out)


def build_defenders(config: DefenderConfig, outputs: TargetOutputs) -> Defenders:
    """Train, gate and self-audit the requested defenses on the target's outputs."""
    trainers = [DEFENDERS.get(name)() for name in config.chosen()]
    if config.recipe not in DEFENDER_RECIPES:
        raise ValueError(f"unknown defender recipe {config.recipe!r}; choose one of {sorted(DEFENDER_RECIPES)}")
    train, held = _split(outputs, config)
    rows = {"train_members": len(train.p_in), "train_nonmembers": len(train.p_out),
            "held_out_members": len(held.p_in), "held_out_nonmembers": len(held.p_out)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trained = {t.name: t.train(config, train, Path(tmp)) for t in trainers}
    served = {name: t.defense for name, t in trained.items()}
    measured = {t.name: quality.measure(served[t.name], held) for t in trainers if t.gated}
    gated = quality.enforce(measured, config.allow_weak_defense)
    files = {t.weights_file: w for t in trainers if t.weights_file and (w := trained[t.name].weights) is not None}
    entries = {"none": DefenseEntry()} | {
        t.name: DefenseEntry(weights=t.weights_file, params=trained[t.name].shipped_params, quality=gated.get(t.name))
        for t in trainers
    }
    report = {"recipe": config.recipe, "holdout": config.holdout, "rows": rows,
              "defenses": {name: t.report for name, t in trained.items()}}  # fmt: skip
    everything = quality.Rows.of(outputs)
    return Defenders(files, entries, report, quality.self_audit(held, served, config.seed, floor_rows=everything))


def defender_summary(manifest: Manifest) -> dict[str, str]:
    """The gate's and the self-audit's lines for the one-screen summary at the end of train/export."""
    out = {}
    for name, entry in manifest.defenses.items():
        q = entry.quality
        if q is None:
            continue
        verdict = "passed" if q.passed else "FAILED, written with --allow-weak-defense"
        flagged = "—" if q.perturbed_share_flagged is None else f"{q.perturbed_share_flagged:.0%}"
        extra = (f", Phase I success {q.phase_one_success:.0%}" if q.phase_one_success is not None
                 else f", after the step {q.classifier_balanced_accuracy_defended:.3f}")  # fmt: skip
        out[f"{name} gate"] = (
            f"{verdict}: classifier balanced accuracy {q.classifier_balanced_accuracy:.3f}{extra}; perturbs {flagged} "
            f"of flagged rows, mean L1 {q.mean_l1:.4f}, label loss {q.label_loss:.3f} "
            f"({q.held_out_members}+{q.held_out_nonmembers} held-out rows)"
        )
    if manifest.self_audit:
        out["self-audit"] = (
            "on the held-out rows (two-fold, threshold learned on the other half; in brackets the "
            "best in-sample threshold, an upper bound)\n" + (quality.format_self_audit(manifest.self_audit))
        )
    return out
