"""Audit a bundle or a deployment: attacks × one predictor → report.json and report.md.

The bundle's ``split.npz`` rebuilds the sets: evaluation members (the target's training rows) against
evaluation non-members the defender's classifiers never saw; the attacker's shadow model trains with
the target's recipe on the shadow split (MemGuard's set-up). With ``adaptive``, the shadow outputs go
through the same defense before the attacks learn from them (an attacker who knows the defense).
Every defended result is printed next to the label-only floor 0.5 + (train_acc − test_acc)/2.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defense_models.attacks import AttackData, available_attacks, create_attack
from defense_models.data import load_dataset
from defense_models.nets import build, predict_logits
from defense_models.predictors import GatewayPredictor, Predictor, RawOnnxPredictor
from defense_models.scoring import accuracy, gap_floor, l1_stats, label_loss, score_attack
from defense_models.training.loop import FitConfig, fit
from gateway.artifacts import load_bundle

DEFAULT_ATTACKS = ("gap", "confidence", "entropy", "modified_entropy", "nn_sorted", "shokri", "inference_model")


@dataclass
class AuditConfig:
    bundle: Path
    defense: str = "none"
    url: str | None = None  # audit a running deployment instead of the in-process gateway
    api_key: str | None = None
    noise_secret: str | None = None  # in-process only; needed for randomized defenses outside --demo
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    adaptive: bool = False
    #: Also run the label-only noise-robustness attack (binary features only); it queries the target
    #: with ``label_only_copies`` perturbed copies of every evaluation row.
    label_only: bool = False
    label_only_copies: int = 20
    shadow_epochs: int | None = None  # override the target recipe's epochs for the shadow model
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0


def _shadow_outputs(manifest: Any, data: Any, parts: dict[str, np.ndarray], config: AuditConfig) -> tuple[Any, ...]:
    """Train the attacker's shadow model with the target's recipe on shadow_in; its outputs on
    shadow_in/out, and the model itself (for query-based attacks)."""
    t = manifest.training
    fit_config = FitConfig(**{**t["fit"], "lr_milestones": tuple(t["fit"]["lr_milestones"]), "seed": config.seed})
    if config.shadow_epochs:
        fit_config = replace(fit_config, epochs=config.shadow_epochs)
    torch.manual_seed(config.seed)
    shadow = build(t["architecture"], data)
    X_in, y_in = torch.from_numpy(data.X[parts["shadow_in"]]), torch.from_numpy(data.y[parts["shadow_in"]])
    fit(shadow, X_in, y_in, fit_config)
    p_in = torch.softmax(predict_logits(shadow, X_in).double(), 1).numpy()
    p_out = torch.softmax(predict_logits(shadow, torch.from_numpy(data.X[parts["shadow_out"]])).double(), 1).numpy()
    return p_in, p_out, shadow


def _defend(bundle: Any, name: str, probs: np.ndarray) -> np.ndarray:
    """The adaptive attacker's copy of the defense, applied to its own shadow outputs."""
    from gateway.defenses import create_defense
    from gateway.defenses._keyed import RowKeyer

    defense = create_defense(name, bundle, {}, torch.device("cpu"))
    keys = torch.from_numpy(RowKeyer(b"attacker's own secret", b"shadow").digests(probs.astype(np.float32)))
    p = torch.from_numpy(probs)
    return defense.defend(p, torch.log(p.clamp_min(1e-30)).float(), keys).double().numpy()


def _noise_robustness(config: AuditConfig, predictor: Predictor, shadow: torch.nn.Module, data: Any,
                      parts: dict[str, np.ndarray]) -> dict[str, Any]:  # fmt: skip
    from defense_models.attacks.label_only import NoiseRobustnessAttack

    def shadow_predict(X: np.ndarray) -> np.ndarray:
        return torch.softmax(predict_logits(shadow, torch.from_numpy(X)).double(), 1).numpy()

    attack = NoiseRobustnessAttack(copies=config.label_only_copies, seed=config.seed)
    rows = {
        r: (data.X[parts[r]], data.y[parts[r]]) for r in ("shadow_in", "shadow_out", "target_train", "eval_nonmember")
    }
    attack.fit(shadow_predict, *rows["shadow_in"], *rows["shadow_out"])
    shadow_scores = (
        attack.score(shadow_predict, *rows["shadow_in"]),
        attack.score(shadow_predict, *rows["shadow_out"]),
    )
    queries_before = attack.queries
    scores = score_attack(attack.score(predictor.predict, *rows["target_train"]),
                          attack.score(predictor.predict, *rows["eval_nonmember"]), shadow=shadow_scores)  # fmt: skip
    return {**scores.as_dict(), "flip_rate": attack.flip, "queries_to_target": attack.queries - queries_before}


def run_audit(config: AuditConfig) -> dict[str, Any]:
    started = time.perf_counter()
    bundle = load_bundle(config.bundle)
    m = bundle.manifest
    t = m.training
    if "split" not in t or "split.npz" not in m.files:
        raise ValueError("this bundle has no recorded split; audit bundles written by `defense_models train`")
    data_path = t["config"].get("data_path")
    data = load_dataset(t["config"]["dataset"], Path(data_path) if data_path else None)
    if data.sha256 != t["dataset"]["sha256"]:
        raise ValueError("the dataset on disk differs from the one the bundle was trained on (sha256 mismatch)")
    with np.load(bundle.path("split.npz")) as f:
        parts = {k: f[k] for k in f.files}
    members_X, members_y = data.X[parts["target_train"]], data.y[parts["target_train"]]
    non_X, non_y = data.X[parts["eval_nonmember"]], data.y[parts["eval_nonmember"]]

    raw = RawOnnxPredictor(config.bundle)
    clean_in, clean_out = raw.predict(members_X), raw.predict(non_X)
    predictor: Predictor
    if config.url:
        predictor = GatewayPredictor.over_http(config.url, api_key=config.api_key)
    elif config.defense == "none":
        predictor = raw
    else:
        extra = {"noise_secret": config.noise_secret} if config.noise_secret else {"demo": True}
        predictor = GatewayPredictor.in_process(config.bundle, defense=config.defense, **extra)
    try:
        if predictor is raw:  # undefended: the released vectors are the clean ones
            rel_in, rel_out = clean_in, clean_out
        else:
            rel_in, rel_out = predictor.predict(members_X), predictor.predict(non_X)
        p_in, p_out, shadow_model = _shadow_outputs(m, data, parts, config)
        label_only = None
        if config.label_only and data.binary:
            label_only = _noise_robustness(config, predictor, shadow_model, data, parts)
    finally:
        close = getattr(predictor, "close", None)
        if close is not None:
            close()

    if config.adaptive and config.defense != "none":
        p_in, p_out = _defend(bundle, config.defense, p_in), _defend(bundle, config.defense, p_out)
    shadow = (AttackData(p_in, data.y[parts["shadow_in"]]), AttackData(p_out, data.y[parts["shadow_out"]]))
    target = (AttackData(rel_in, members_y), AttackData(rel_out, non_y))

    train_acc, test_acc = accuracy(rel_in, members_y), accuracy(rel_out, non_y)
    floor = gap_floor(train_acc, test_acc)
    results = {}
    for name in config.attacks:
        attack = create_attack(name, **config.attack_options.get(name, {}))
        attack.fit(*shadow)
        shadow_scores = (attack.score(shadow[0]), attack.score(shadow[1]))
        results[name] = score_attack(attack.score(target[0]), attack.score(target[1]), shadow=shadow_scores).as_dict()
    if label_only is not None:
        results["noise_robustness"] = label_only
    both_clean, both_released = np.concatenate([clean_in, clean_out]), np.concatenate([rel_in, rel_out])
    return {
        "bundle": {"name": m.name, "version": m.version},
        "target": config.url or f"in-process gateway ({config.defense})",
        "defense": config.defense,
        "adaptive": config.adaptive,
        "utility": {
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
            "label_only_floor": floor,
            "label_loss": label_loss(both_released, both_clean),
            "l1": l1_stats(both_released, both_clean),
            "l1_members": l1_stats(rel_in, clean_in),
            "l1_nonmembers": l1_stats(rel_out, clean_out),
        },
        "attacks": results,
        "sets": {
            "members": len(members_y),
            "nonmembers": len(non_y),
            "shadow_in": len(shadow[0]),
            "shadow_out": len(shadow[1]),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    u = report["utility"]
    lines = [
        f"# Membership-inference audit: {report['bundle']['name']} {report['bundle']['version']}",
        "",
        f"Target: {report['target']}; defense `{report['defense']}`"
        f"{' (adaptive attacker: shadow outputs defended too)' if report['adaptive'] else ''}.",
        f"Test accuracy {u['test_accuracy']:.4f} (train {u['train_accuracy']:.4f}); label loss {u['label_loss']:.4f}; "
        f"mean L1 {u['l1']['mean']:.4f} (members {u['l1_members']['mean']:.4f}, non-members "
        f"{u['l1_nonmembers']['mean']:.4f}).",
        f"**Label-only floor: {u['label_only_floor']:.4f}** = 0.5 + (train − test)/2: no label-preserving defense "
        "can push an attack below it.",
        "",
        "| attack | balanced acc. (shadow τ) | oracle | AUC | TPR@1% FPR | TPR@0.1% FPR | vs floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["attacks"].items():
        lines.append(
            f"| {name} | {s['balanced_accuracy']:.4f} | {s['oracle_balanced_accuracy']:.4f} | {s['auc']:.4f} | "
            f"{s['tpr_at_1pct_fpr']:.4f} | {s['tpr_at_01pct_fpr']:.4f} | "
            f"{s['balanced_accuracy'] - u['label_only_floor']:+.4f} |"
        )
    lines += ["", f"Sets: {report['sets']}. TPR@0.1% FPR resolves 1/{report['sets']['nonmembers']}.", ""]
    (out / "report.md").write_text("\n".join(lines))


__all__ = ["DEFAULT_ATTACKS", "AuditConfig", "available_attacks", "run_audit", "write_report"]
