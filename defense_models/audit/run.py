"""Audit a bundle or a deployment: attacks × attacker knowledge × one predictor → a report.

The bundle's ``split.npz`` rebuilds the sets: evaluation members (the target's training rows) against
evaluation non-members the defender's classifiers never saw; the attacker's shadow model trains with
the target's recipe on the shadow split (MemGuard's set-up).

Three families of attacks:

* vector attacks (``audit.attacks`` registry) learn from released vectors. They run once per attacker
  *view* (what the attacker knows, ``audit.views``).
* label-only attacks (``attacks.label_only.LABEL_ONLY_ATTACKS``) query the endpoint and read labels
  only, each within a query budget per row.
* LiRA (``lira_shadows``): reference models from ``python -m defense_models shadows`` on the
  evaluation pool, online and offline.

``run_audit`` runs four steps: load the sets, query the target (and build the views), fit the attacks,
write the report. Every defended result is reported next to the label-only floor
0.5 + (train_acc − test_acc)/2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from defense_models.audit.attacks import available_attacks, create_attack, reads_confidences
from defense_models.audit.attacks.label_only import LABEL_ONLY_ATTACKS
from defense_models.audit.config import VIEWS, AuditConfig
from defense_models.audit.predictors import GatewayPredictor, Predictor, RawOnnxPredictor
from defense_models.audit.queries import label_only_attack, lira, metrics_probe, timing_probe
from defense_models.audit.schema import (
    AttackerData,
    AttackResult,
    AuditReport,
    BestAttack,
    MetricsProbe,
    Summary,
    TimingProbe,
)
from defense_models.audit.scoring import (
    accuracy,
    auc,
    expected_calibration_error,
    gap_floor,
    l1_stats,
    label_loss,
    negative_log_likelihood,
    score_attack,
    top_k_accuracy,
)
from defense_models.audit.views import Arrays, AttackerDefense, Sets, View, build_views, per_class, softmax_predict
from defense_models.training.data import Split, load_dataset
from defense_models.training.loop import FitConfig, fit
from defense_models.training.nets import build
from defense_models.training.recipes import TrainConfig, recipe
from gateway.artifacts import Bundle, load_bundle

SPLIT_ROLES = ("target_train", "eval_nonmember", "shadow_in", "shadow_out")
#: A jittered copy "got the same answer" within this L1 distance (its clean output moved ~1e-4).
NEAR_REPEAT_L1 = 1e-3


@dataclass
class AuditResult:
    """The report and the arrays its plots need."""

    report: AuditReport
    scores: dict[str, Arrays]  # "view/attack" -> (member scores [M], non-member scores [N])
    clean: Arrays  # undefended vectors on members, non-members
    released: Arrays
    labels: Arrays


@dataclass
class _Queried:
    """What the audit learned from the target: released vectors, the views, label-only results."""

    released: Arrays
    views: dict[str, View]
    repeats: tuple[float, float] | None  # share answered identically: exact repeats, jittered copies
    attacker: AttackerData
    results: dict[str, AttackResult] = field(default_factory=dict)
    metrics_probe: MetricsProbe | None = None
    timing_probe: TimingProbe | None = None
    scores: dict[str, Arrays] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


# --- step 1: the records ---------------------------------------------------------------------------
def _check_names(config: AuditConfig) -> None:
    unknown = [a for a in config.attacks if a not in available_attacks()]
    unknown += [a for a in config.label_only if a not in LABEL_ONLY_ATTACKS.names()]
    unknown += [v for v in config.views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown attack or view {unknown}; attacks: {available_attacks()}, label-only: "
                         f"{LABEL_ONLY_ATTACKS.names()}, views: {list(VIEWS)}")  # fmt: skip


def load_sets(config: AuditConfig, bundle: Bundle) -> Sets:
    """The audit's records: the bundle's own dataset and split, or ``config.split_file`` over ``config.dataset``."""
    t = bundle.manifest.training
    if config.split_file is None:
        if t is None or t.dataset is None or t.split is None or t.split.file not in bundle.manifest.files:
            raise ValueError("this bundle records no split (a user's model from `export`): pass --dataset, --data "
                             "and --split-file with the records to audit (target_train, eval_nonmember, shadow_in, "
                             "shadow_out)")  # fmt: skip
        data = load_dataset(t.dataset.loader, Path(t.dataset.data_path) if t.dataset.data_path else None)
        if data.sha256 != t.dataset.sha256:
            raise ValueError("the dataset on disk differs from the one the bundle was trained on (sha256 mismatch)")
        return _sampled(Sets(data, Split.load(bundle.path(t.split.file)).parts), config)
    if config.dataset is None:
        raise ValueError("--split-file needs --dataset (and --data for datasets that are not bundled)")
    data = load_dataset(config.dataset, config.data_path)
    parts = Split.load(config.split_file).parts
    if missing := [r for r in SPLIT_ROLES if r not in parts]:
        raise ValueError(f"{config.split_file} lacks the roles {missing} (it has {sorted(parts)})")
    if max(int(v.max(initial=-1)) for v in parts.values()) >= len(data.y):
        raise ValueError(f"{config.split_file} indexes rows beyond the {len(data.y)} rows of {data.name}")
    return _sampled(Sets(data, parts), config)


def _sampled(sets: Sets, config: AuditConfig) -> Sets:
    """``config.eval_rows`` members and as many non-members, a seeded sample in the split's order."""
    n = config.eval_rows
    if n is None:
        return sets
    rng = np.random.default_rng([config.seed, 0x5A3])
    parts = dict(sets.parts)
    for role in ("target_train", "eval_nonmember"):
        if n < len(parts[role]):
            parts[role] = np.sort(rng.choice(parts[role], n, replace=False))
    return replace(sets, parts=parts)


# --- step 2: query the target, build the attacker's models and views ------------------------------
def _shadow_recipe(bundle: Bundle, sets: Sets, config: AuditConfig) -> tuple[str, FitConfig]:
    """The target's recipe when the bundle records it; else our recipe for the dataset's family."""
    t = bundle.manifest.training
    if t is not None and t.fit is not None and t.architecture is not None:
        arch = t.architecture
        fit_config = FitConfig(**{**t.fit, "lr_milestones": tuple(t.fit["lr_milestones"]), "seed": config.seed})
    else:
        arch, fit_config = recipe(TrainConfig(dataset=sets.data.name, seed=config.seed), sets.data)
    if config.shadow_epochs:
        fit_config = replace(fit_config, epochs=config.shadow_epochs)
    return config.shadow_arch or arch, fit_config


def _shadow_model(bundle: Bundle, sets: Sets, config: AuditConfig) -> torch.nn.Module:
    """The attacker's shadow model, trained with the target's recipe on shadow_in."""
    arch, fit_config = _shadow_recipe(bundle, sets, config)
    torch.manual_seed(config.seed)
    shadow = build(arch, sets.data)
    X, y = sets.rows("shadow_in")
    fit(shadow, torch.from_numpy(X), torch.from_numpy(y), fit_config, progress=config.progress, desc="shadow model")
    return shadow.eval()


def _open_predictor(config: AuditConfig, raw: RawOnnxPredictor) -> Predictor:
    if config.url:
        return GatewayPredictor.over_http(config.url, api_key=config.api_key)
    if config.defense == "none" and not config.defense_params:
        return raw
    extra = {"noise_secret": config.noise_secret} if config.noise_secret else {"demo": True}
    return GatewayPredictor.in_process(config.bundle, defense=config.defense, defense_params=config.defense_params,
                                       log_level="warning", **extra)  # fmt: skip


def _attacker_records(config: AuditConfig, sets: Sets, predictor: Predictor) -> AttackerData:
    """Replace the shadow split's records by the attacker's own (``attacker_data``) unless they are real."""
    if config.attacker_data == "real":
        return AttackerData(source="real", params=config.attacker_data_params)
    from defense_models.audit.attacker_data import attacker_records

    records = attacker_records(config.attacker_data, sets.rows("shadow_in"), sets.rows("shadow_out"),
                               predictor.predict, seed=config.seed, **config.attacker_data_params)  # fmt: skip
    sets.shadow = {"shadow_in": (records.X_in, records.y_in), "shadow_out": (records.X_out, records.y_out)}
    return AttackerData(**records.summary(config.attacker_data), params=config.attacker_data_params)


def _repeats_identical(config: AuditConfig, predictor: Predictor, X: np.ndarray,
                       answered: np.ndarray) -> tuple[float, float]:  # fmt: skip
    """The same queries again: the share answered bit-identically; copies jittered by ±``jitter``: the share
    answered within ``NEAR_REPEAT_L1`` of the original (the same draw)."""
    rng = np.random.default_rng(config.seed + 2)
    jittered = (X + rng.uniform(-config.jitter, config.jitter, X.shape)).astype(np.float32)
    exact = float((np.abs(predictor.predict(X) - answered).max(axis=1) == 0).mean())
    near = float((np.abs(predictor.predict(jittered) - answered).sum(axis=1) <= NEAR_REPEAT_L1).mean())
    return exact, near


def _query(config: AuditConfig, bundle: Bundle, sets: Sets, clean: Arrays, raw: RawOnnxPredictor,
           defend: AttackerDefense | None) -> _Queried:  # fmt: skip
    """Everything that needs the target: released vectors, repeats, attacker data, views, label-only attacks."""
    predictor = _open_predictor(config, raw)
    try:
        (X_in, _), (X_out, _) = sets.rows("target_train"), sets.rows("eval_nonmember")
        released = clean if predictor is raw else (predictor.predict(X_in), predictor.predict(X_out))
        repeats = None if predictor is raw else _repeats_identical(config, predictor, X_in[:200], released[0][:200])
        attacker = _attacker_records(config, sets, predictor)
        predict_shadow = softmax_predict(_shadow_model(bundle, sets, config))
        views = build_views(config, predictor, defend, sets, predict_shadow, released)
        queried = _Queried(released, views, repeats, attacker)
        if config.metrics_probe_rows:
            queried.metrics_probe = metrics_probe(config, predictor, sets)
        if config.timing_probe_rows:
            queried.timing_probe = timing_probe(config, predictor, sets)
        for name in config.label_only:
            if (done := label_only_attack(config, name, predictor, predict_shadow, sets, released)) is not None:
                queried.results[f"label-only/{name}"], queried.scores[f"label-only/{name}"] = done
                queried.notes["label-only"] = "label queries only, within a per-row query budget"
        return queried
    finally:
        if predictor is not raw and (close := getattr(predictor, "close", None)) is not None:
            close()


# --- step 3: the vector attacks in every view --------------------------------------------------------
def _fit_attacks(config: AuditConfig, q: _Queried) -> dict[str, dict[int, float]]:
    """Fit and score every vector attack in every view into ``q``; -> per-class balanced accuracies."""
    per_class_acc: dict[str, dict[int, float]] = {}
    bar = tqdm(total=len(q.views) * len(config.attacks), desc="attacks", disable=not config.progress, leave=False)
    fitted: dict[tuple[int, str], Any] = {}  # views that train on the same data share the fitted attack
    for view_name, view in q.views.items():
        q.notes[view_name] = view.note
        for name in config.attacks:
            bar.set_postfix_str(f"{view_name}/{name}")
            t0 = time.perf_counter()
            if (id(view.train), name) not in fitted:
                fitted[(id(view.train), name)] = create_attack(name, **config.attack_options.get(name, {}))
                fitted[(id(view.train), name)].fit(*view.train)
            attack = fitted[(id(view.train), name)]
            on = view.calibrate or view.train
            calib = (attack.score(on[0]), attack.score(on[1]))
            pair = attack.score(view.test[0]), attack.score(view.test[1])
            sign = -1.0 if view.orient and auc(*calib) < 0.5 else 1.0
            calib, pair = (sign * calib[0], sign * calib[1]), (sign * pair[0], sign * pair[1])
            s = score_attack(*pair, shadow=calib)
            key = f"{view_name}/{name}"
            q.results[key] = AttackResult(**s.as_dict(), seconds=round(time.perf_counter() - t0, 1),
                                          orientation=sign if view.orient else None)  # fmt: skip
            q.scores[key] = pair
            per_class_acc[key] = per_class(*pair, view.test[0].labels, view.test[1].labels, s.threshold)
            bar.update()
    bar.close()
    return per_class_acc


# --- step 4: the report ----------------------------------------------------------------------------
def _is_confidence_based(key: str) -> bool:
    family, name = key.split("/", 1)
    if family == "reference":
        return name != "lira_label"  # LiRA reads the confidence on the true label; its label variant does not
    return family != "label-only" and name in available_attacks() and reads_confidences(name)


def summarize(results: dict[str, AttackResult], floor: float) -> Summary:
    """Best attacks and the goals, judged on shadow-threshold balanced accuracy."""

    def best(keys: list[str]) -> BestAttack | None:
        if not keys:
            return None
        k = max(keys, key=lambda k: results[k].balanced_accuracy)
        return BestAttack(attack=k, balanced_accuracy=results[k].balanced_accuracy, auc=results[k].auc)

    worst = best([k for k in results if _is_confidence_based(k)])
    return Summary(
        best_attack=best(list(results)),
        best_confidence_based=worst,
        confidence_based_within_1pt_of_floor=worst is None or worst.balanced_accuracy <= floor + 0.01,
        max_tpr_at_01pct_fpr=max((r.tpr_at_01pct_fpr for r in results.values()), default=0.0),
    )


def _user_cost(released: np.ndarray, clean: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-5 accuracy, calibration error and NLL of the released vectors next to the undefended ones."""
    out = {}
    for prefix, p in (("", released), ("undefended_", clean)):
        out[f"{prefix}top5_accuracy"] = top_k_accuracy(p, labels, 5)
        out[f"{prefix}ece"] = expected_calibration_error(p, labels)
        out[f"{prefix}nll"] = negative_log_likelihood(p, labels)
    return out


def _report(config: AuditConfig, bundle: Bundle, sets: Sets, clean: Arrays, q: _Queried,
            per_class_acc: dict[str, dict[int, float]], seconds: float) -> AuditReport:  # fmt: skip
    m, released = bundle.manifest, q.released
    y_in, y_out = sets.rows("target_train")[1], sets.rows("eval_nonmember")[1]
    train_acc, test_acc = accuracy(released[0], y_in), accuracy(released[1], y_out)
    floor = gap_floor(train_acc, test_acc)
    both_clean, both_released = np.concatenate(clean), np.concatenate(released)
    return AuditReport.model_validate({
        "bundle": {"name": m.name, "version": m.version,
                   "replacement": m.training.replacement.get("kind") if m.training else None},
        "target": config.url or f"in-process gateway ({config.defense})",
        "defense": config.defense, "defense_params": config.defense_params,
        "defended": config.defense != "none" or config.url is not None,
        "views": q.notes, "attacker_data": q.attacker,
        "utility": {
            "train_accuracy": train_acc, "test_accuracy": test_acc,
            "undefended_test_accuracy": accuracy(clean[1], y_out), "label_only_floor": floor,
            "label_loss": label_loss(both_released, both_clean), "l1": l1_stats(both_released, both_clean),
            "l1_members": l1_stats(released[0], clean[0]), "l1_nonmembers": l1_stats(released[1], clean[1]),
            "exact_repeats_identical": q.repeats and q.repeats[0],
            "near_repeats_agree": q.repeats and q.repeats[1],
            **_user_cost(released[1], clean[1], y_out),
        },
        "attacks": q.results, "per_class_balanced_accuracy": per_class_acc, "summary": summarize(q.results, floor),
        "sets": {"members": len(y_in), "nonmembers": len(y_out), "shadow_in": len(sets.rows("shadow_in")[1]),
                 "shadow_out": len(sets.rows("shadow_out")[1])},
        "seconds": round(seconds, 1), "metrics_probe": q.metrics_probe,
        "timing_probe": q.timing_probe,
    })  # fmt: skip


def run_audit(config: AuditConfig) -> AuditResult:
    started = time.perf_counter()
    bundle = load_bundle(config.bundle)
    _check_names(config)
    sets = load_sets(config, bundle)
    defend = AttackerDefense(bundle, config.defense, config.defense_params) if config.defense != "none" else None
    raw = RawOnnxPredictor(config.bundle)
    clean = raw.predict(sets.rows("target_train")[0]), raw.predict(sets.rows("eval_nonmember")[0])
    queried = _query(config, bundle, sets, clean, raw, defend)
    per_class_acc = _fit_attacks(config, queried)
    if config.lira_shadows is not None:
        for key, (res, pair) in lira(config, sets, queried.released, defend).items():
            queried.results[f"reference/{key}"], queried.scores[f"reference/{key}"] = res, pair
        queried.notes["reference"] = "LiRA on reference models trained on random halves of the evaluation pool"
    report = _report(config, bundle, sets, clean, queried, per_class_acc, time.perf_counter() - started)
    labels = sets.rows("target_train")[1], sets.rows("eval_nonmember")[1]
    return AuditResult(report, queried.scores, clean, queried.released, labels)


__all__ = ["AuditConfig", "AuditResult", "run_audit", "summarize"]
