"""Audit a bundle or a deployment: attacks × attacker knowledge × one predictor → a report.

The bundle's ``split.npz`` rebuilds the sets: evaluation members (the target's training rows) against
evaluation non-members the defender's classifiers never saw; the attacker's shadow model trains with
the target's recipe on the shadow split (MemGuard's set-up).

Three families of attacks:

* vector attacks (``defense_models.attacks`` registry) learn from released vectors. They run once per
  attacker *view* (what the attacker knows, ``VIEWS``): shadow outputs as they are; shadow outputs
  through the same defense (adaptive); the endpoint's own outputs on half of the evaluation members
  and non-members (known records, scored on the other half); rounding before attacking; averaging
  repeated queries (jittered, so each copy has its own noise key).
* label-only attacks (``label_only``) query the endpoint and read labels only: noise robustness
  (binary features) and boundary distance (HopSkipJump), each within a query budget per row.
* LiRA (``lira_shadows``): reference models from ``python -m defense_models shadows`` on the
  evaluation pool, online and offline.

Every defended result is reported next to the label-only floor 0.5 + (train_acc − test_acc)/2.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from defense_models.attacks import AttackData, available_attacks, create_attack
from defense_models.data import Split, load_dataset
from defense_models.nets import build, predict_logits
from defense_models.predictors import GatewayPredictor, Predictor, RawOnnxPredictor
from defense_models.scoring import (
    accuracy,
    auc,
    balanced_accuracy_at,
    gap_floor,
    l1_stats,
    label_loss,
    score_attack,
)
from defense_models.training.loop import FitConfig, fit
from gateway.artifacts import load_bundle

DEFAULT_ATTACKS = (
    "gap",
    "confidence",
    "entropy",
    "modified_entropy",
    "nn_sorted",
    "shokri",
    "shokri_one",
    "inference_model",
)
#: Attacks that read the released confidence values (all but the gap attack's label check): the
#: issue's "confidence-based" goal applies to these.
CONFIDENCE_BASED = frozenset(DEFAULT_ATTACKS) - {"gap"}
#: What the attacker knows. ``shadow`` and ``known`` need no defense; the others use the attacker's
#: copy of it (``--adaptive`` selects all).
VIEWS = ("shadow", "adaptive", "flipped", "known", "rounded", "repeated")
LABEL_ONLY = ("noise_robustness", "boundary_distance")
#: Per-class accuracies only for classes with at least this many members and non-members.
PER_CLASS_MIN_ROWS = 10


@dataclass
class AuditConfig:
    bundle: Path
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"epsilon": 0.5}
    url: str | None = None  # audit a running deployment instead of the in-process gateway
    api_key: str | None = None
    noise_secret: str | None = None  # in-process only; needed for randomized defenses outside --demo
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    views: tuple[str, ...] = ("shadow",)
    #: Label-only attacks to run (they query the target: ``label_only_rows`` members and as many
    #: non-members, ``label_only_queries`` queries per row at most).
    label_only: tuple[str, ...] = ()
    label_only_rows: int = 250
    label_only_queries: int = 200
    label_only_copies: int = 20  # noise robustness: perturbed copies per row
    lira_shadows: Path | None = None  # reference models from `defense_models shadows`
    known_fraction: float = 0.5  # view "known": share of evaluation records the attacker knows
    round_decimals: int = 2  # view "rounded"
    repeats: int = 5  # view "repeated": queries averaged per record
    jitter: float = 1e-4  # view "repeated": uniform input jitter making each copy a new query
    shadow_epochs: int | None = None  # override the target recipe's epochs for the shadow model
    #: Where the shadow model's training data comes from (``attacker_data``: real, noisy, marginal,
    #: model) and the source's options (e.g. {"flip": 0.2}, {"max_queries": 100000}).
    attacker_data: str = "real"
    attacker_data_params: dict[str, Any] = field(default_factory=dict)
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: For a bundle without a recorded split (``export``: the user's own model): the dataset the split
    #: file indexes, and the file (``.npz`` with index arrays target_train = evaluation members,
    #: eval_nonmember, shadow_in, shadow_out). Also overrides a bundle's own split.
    dataset: str | None = None
    data_path: Path | None = None
    split_file: Path | None = None
    #: The attacker's shadow architecture where the bundle records none (default: our recipe for the
    #: dataset's family).
    shadow_arch: str | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class AuditResult:
    """The report (JSON-ready) and the arrays its plots need."""

    report: dict[str, Any]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # "view/attack" -> (member scores [M], non-member scores [N])
    clean: tuple[np.ndarray, np.ndarray]  # undefended vectors on members, non-members
    released: tuple[np.ndarray, np.ndarray]
    labels: tuple[np.ndarray, np.ndarray]


@dataclass
class _Sets:
    data: Any
    parts: dict[str, np.ndarray]
    #: The attacker's own records for shadow_in / shadow_out (from ``attacker_data``), if not the split's.
    shadow: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def rows(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        if role in self.shadow:
            return self.shadow[role]
        return self.data.X[self.parts[role]], self.data.y[self.parts[role]]


# --- the attacker's models and its copy of the defense -----------------------------------------------
def _shadow_recipe(manifest: Any, sets: _Sets, config: AuditConfig) -> tuple[str, FitConfig]:
    """The target's recipe when the bundle records it; else our recipe for the dataset's family."""
    t = manifest.training
    if "fit" in t and "architecture" in t:
        arch = t["architecture"]
        fit_config = FitConfig(**{**t["fit"], "lr_milestones": tuple(t["fit"]["lr_milestones"]), "seed": config.seed})
    else:
        from defense_models.pipeline import TrainConfig, recipe

        arch, fit_config = recipe(TrainConfig(dataset=sets.data.name, seed=config.seed), sets.data)
    return config.shadow_arch or arch, fit_config


def _shadow_model(manifest: Any, sets: _Sets, config: AuditConfig) -> torch.nn.Module:
    """The attacker's shadow model, trained with the target's recipe on shadow_in."""
    arch, fit_config = _shadow_recipe(manifest, sets, config)
    if config.shadow_epochs:
        fit_config = replace(fit_config, epochs=config.shadow_epochs)
    torch.manual_seed(config.seed)
    shadow = build(arch, sets.data)
    X, y = sets.rows("shadow_in")
    fit(shadow, torch.from_numpy(X), torch.from_numpy(y), fit_config, progress=config.progress, desc="shadow model")
    return shadow.eval()


_Predict = Callable[[np.ndarray], np.ndarray]  # X [N, D] -> probabilities [N, C]


def _softmax_predict(model: torch.nn.Module) -> _Predict:
    def predict(X: np.ndarray) -> np.ndarray:
        return torch.softmax(predict_logits(model, torch.from_numpy(np.asarray(X, np.float32))).double(), 1).numpy()

    return predict


class _AttackerDefense:
    """The adaptive attacker's own copy of the defense (same bundle and parameters, its own secret)."""

    def __init__(self, bundle: Any, name: str, params: dict[str, Any]) -> None:
        from gateway.defenses import create_defense

        self._defense = create_defense(name, bundle, params, torch.device("cpu"))

    def __call__(self, probs: np.ndarray, secret: bytes = b"attacker's own secret") -> np.ndarray:
        """What the gateway's release path makes of these outputs, with the attacker's own secret."""
        from gateway.pipeline import release_vectors

        return release_vectors(self._defense, probs, secret=secret, context=b"shadow")


def round_vectors(probs: np.ndarray, decimals: int) -> np.ndarray:
    """The "rounded" attacker's pre-processing: round to ``decimals`` and renormalise (rows that round
    to all zeros stay as they were)."""
    r = np.round(probs, decimals)
    s = r.sum(axis=1, keepdims=True)
    return np.where(s > 0, r / np.where(s > 0, s, 1), probs)


# --- views: what each attacker trains on and what it scores -----------------------------------------
_Arrays = tuple[np.ndarray, np.ndarray]  # (members' rows, non-members' rows)
_Pair = tuple[AttackData, AttackData]


@dataclass(frozen=True)
class _View:
    train: _Pair  # what the attack model learns from
    test: _Pair  # what it scores: evaluation members, non-members
    note: str
    calibrate: _Pair | None = None  # where the attacker sets its threshold (default: train)
    orient: bool = False  # flip the score when it ranks the calibration members below non-members


def _views(config: AuditConfig, predictor: Predictor, defend: _AttackerDefense | None, sets: _Sets,
           shadow_p: _Arrays, released: _Arrays) -> dict[str, Any]:  # fmt: skip
    """view name -> what the attacker trains on, scores and calibrates with."""
    y_sin, y_sout = sets.rows("shadow_in")[1], sets.rows("shadow_out")[1]
    y_in, y_out = sets.data.y[sets.parts["target_train"]], sets.data.y[sets.parts["eval_nonmember"]]
    target = (AttackData(released[0], y_in), AttackData(released[1], y_out))
    views: dict[str, _View] = {}
    raw = (AttackData(shadow_p[0], y_sin), AttackData(shadow_p[1], y_sout))
    if "shadow" in config.views:
        views["shadow"] = _View(raw, target, "shadow model's outputs as they are")
    if "known" in config.views:
        rng = np.random.default_rng(config.seed)
        k_in = rng.random(len(y_in)) < config.known_fraction  # the records the attacker knows
        k_out = rng.random(len(y_out)) < config.known_fraction
        train = (AttackData(released[0][k_in], y_in[k_in]), AttackData(released[1][k_out], y_out[k_out]))
        test = (AttackData(released[0][~k_in], y_in[~k_in]), AttackData(released[1][~k_out], y_out[~k_out]))
        views["known"] = _View(train, test, f"endpoint's outputs on {config.known_fraction:.0%} of the evaluation "
                               "records, scored on the rest")  # fmt: skip
    if defend is None:
        return views
    views.update(_defense_aware_views(config, predictor, defend, sets, shadow_p, released, raw, target))
    return {v: views[v] for v in VIEWS if v in views}  # report in VIEWS order


def _defense_aware_views(
    config: AuditConfig, predictor: Predictor, defend: _AttackerDefense, sets: _Sets, shadow_p: _Arrays,
    released: _Arrays, raw: _Pair, target: _Pair,
) -> dict[str, _View]:  # fmt: skip
    """The views that need the attacker's copy of the defense."""
    y_sin, y_sout = raw[0].labels, raw[1].labels
    y_in, y_out = target[0].labels, target[1].labels
    views: dict[str, _View] = {}
    defended = (defend(shadow_p[0]), defend(shadow_p[1]))
    adaptive = (AttackData(defended[0], y_sin), AttackData(defended[1], y_sout))
    if "adaptive" in config.views:
        views["adaptive"] = _View(adaptive, target, "shadow outputs passed through the same defense")
    if "flipped" in config.views:
        views["flipped"] = _View(raw, target, "trained on raw shadow outputs; orientation and threshold set on "
                                 "defended shadow outputs (a defense that inverts decisions leaks as AUC < 0.5)",
                                 calibrate=adaptive, orient=True)  # fmt: skip
    if "rounded" in config.views:
        d = config.round_decimals
        rounded_train = (AttackData(round_vectors(adaptive[0].probs, d), y_sin),
                         AttackData(round_vectors(adaptive[1].probs, d), y_sout))  # fmt: skip
        rounded_test = (
            AttackData(round_vectors(released[0], d), y_in),
            AttackData(round_vectors(released[1], d), y_out),
        )
        views["rounded"] = _View(rounded_train, rounded_test, f"adaptive, every vector rounded to {d} decimals first")
    if "repeated" in config.views:
        rng = np.random.default_rng(config.seed + 1)
        r = config.repeats
        X_in, X_out = sets.rows("target_train")[0], sets.rows("eval_nonmember")[0]

        def averaged(X: np.ndarray) -> np.ndarray:
            jittered = np.repeat(X, r, axis=0) + rng.uniform(-config.jitter, config.jitter, (len(X) * r, X.shape[1]))
            return predictor.predict(jittered.astype(np.float32)).reshape(len(X), r, -1).mean(axis=1)

        def shadow_averaged(p: np.ndarray) -> np.ndarray:
            return np.mean([defend(p, secret=f"copy {i}".encode()) for i in range(r)], axis=0)

        views["repeated"] = _View(
            (AttackData(shadow_averaged(shadow_p[0]), y_sin), AttackData(shadow_averaged(shadow_p[1]), y_sout)),
            (AttackData(averaged(X_in), y_in), AttackData(averaged(X_out), y_out)),
            f"{r} queries per record, inputs jittered by ±{config.jitter:g} so each copy gets its own noise key",
        )
    return views


def _per_class(members: np.ndarray, nonmembers: np.ndarray, y_in: np.ndarray, y_out: np.ndarray,
               tau: float) -> dict[int, float]:  # fmt: skip
    out = {}
    for c in np.union1d(y_in, y_out):
        m, n = members[y_in == c], nonmembers[y_out == c]
        if min(m.size, n.size) >= PER_CLASS_MIN_ROWS:
            out[int(c)] = balanced_accuracy_at(m, n, tau)
    return out


# --- label-only and reference-model attacks ------------------------------------------------------------
def _label_only(config: AuditConfig, name: str, predictor: Predictor, shadow_predict: _Predict, sets: _Sets,
                released: _Arrays) -> tuple[dict[str, Any], _Arrays]:  # fmt: skip
    from defense_models.attacks.label_only import BoundaryDistanceAttack, NoiseRobustnessAttack

    n = config.label_only_rows
    rows = {
        r: tuple(a[:n] for a in sets.rows(r)) for r in ("shadow_in", "shadow_out", "target_train", "eval_nonmember")
    }
    attack: Any
    if name == "noise_robustness":
        attack = NoiseRobustnessAttack(copies=config.label_only_copies, seed=config.seed)
        extra: dict[str, Any] = {}
    else:
        lo, hi = float(sets.data.X.min()), float(sets.data.X.max())  # the feature box
        attack = BoundaryDistanceAttack(max_queries=config.label_only_queries, lo=lo, hi=hi, seed=config.seed)
        extra = {"max_queries_per_row": attack.max_queries}
    calib = attack.fit(shadow_predict, *rows["shadow_in"], *rows["shadow_out"])  # shadow scores: the threshold
    if name == "noise_robustness":
        extra["flip_rate"] = attack.flip
    before = attack.queries
    s = attack.score(predictor.predict, *rows["target_train"]), attack.score(predictor.predict, *rows["eval_nonmember"])
    spent = attack.queries - before
    (_, y_in), (_, y_out) = rows["target_train"], rows["eval_nonmember"]
    floor = gap_floor(accuracy(released[0][:n], y_in), accuracy(released[1][:n], y_out))  # on these rows
    return {**score_attack(*s, shadow=calib).as_dict(), **extra, "queries_to_target": spent,
            "queries_per_row": spent / (2 * len(y_in)), "label_only_floor_on_rows": floor}, s  # fmt: skip


def _lira(config: AuditConfig, sets: _Sets, released: _Arrays,
          defend: _AttackerDefense | None) -> dict[str, tuple[dict[str, Any], _Arrays]]:  # fmt: skip
    from defense_models.attacks.lira import Lira, logit_confidence
    from defense_models.shadows import load_shadows

    assert config.lira_shadows is not None
    refs = load_shadows(config.lira_shadows, sets.data)
    if len(refs) < 4:
        raise ValueError(f"LiRA needs at least 4 reference models in {config.lira_shadows}, found {len(refs)}")
    pool = np.asarray(refs[0][1]["pool_rows"])
    position = {int(r): i for i, r in enumerate(pool)}
    members, nonmembers = sets.parts["target_train"], sets.parts["eval_nonmember"]
    missing = [r for r in np.concatenate([members, nonmembers]) if int(r) not in position]
    if missing or refs[0][1]["dataset_sha256"] != sets.data.sha256:
        raise ValueError(
            "the reference models were not trained on this bundle's evaluation records "
            "(train them with `defense_models shadows` and the bundle's dataset, split and seed)"
        )
    idx = np.array([position[int(r)] for r in np.concatenate([members, nonmembers])])
    X, y = sets.data.X[pool], sets.data.y[pool]
    phi, masks = [], []
    for model, meta in tqdm(refs, desc="LiRA references", disable=not config.progress, leave=False):
        p = _softmax_predict(model.eval())(X)
        if defend is not None:  # the adaptive attacker defends its reference outputs too
            p = defend(p)
        phi.append(logit_confidence(p, y)[idx])
        masks.append(np.asarray(meta["in_mask"], bool)[idx])
    phi_refs, in_refs = np.stack(phi), np.stack(masks)  # [K, N_members + N_nonmembers]
    y_eval = sets.data.y[np.concatenate([members, nonmembers])]
    target_phi = logit_confidence(np.concatenate(released), y_eval)
    out = {}
    for online in (True, False):
        attack = Lira(online=online)
        attack.fit(phi_refs, in_refs)
        s = attack.score(target_phi)
        pair = s[: len(members)], s[len(members) :]
        calib = Lira.leave_one_out(phi_refs, in_refs, online)
        out["lira_online" if online else "lira_offline"] = (
            {**score_attack(*pair, shadow=calib).as_dict(), "reference_models": len(refs)},
            pair,
        )
    return out


# --- the audit ------------------------------------------------------------------------------------------
def _open_predictor(config: AuditConfig, raw: RawOnnxPredictor) -> Predictor:
    if config.url:
        return GatewayPredictor.over_http(config.url, api_key=config.api_key)
    if config.defense == "none" and not config.defense_params:
        return raw
    extra = {"noise_secret": config.noise_secret} if config.noise_secret else {"demo": True}
    return GatewayPredictor.in_process(config.bundle, defense=config.defense, defense_params=config.defense_params,
                                       log_level="warning", **extra)  # fmt: skip


def _summary(results: dict[str, dict[str, Any]], floor: float) -> dict[str, Any]:
    """Best attacks and the issue's goals, judged on shadow-threshold balanced accuracy."""

    def best(keys: list[str]) -> dict[str, Any] | None:
        if not keys:
            return None
        k = max(keys, key=lambda k: results[k]["balanced_accuracy"])
        return {"attack": k, "balanced_accuracy": results[k]["balanced_accuracy"], "auc": results[k]["auc"]}

    confidence_based = [k for k in results if k.split("/")[-1] in CONFIDENCE_BASED or "lira" in k]
    max_tpr = max((results[k]["tpr_at_01pct_fpr"] for k in results), default=0.0)
    worst = best(confidence_based)
    return {
        "best_attack": best(list(results)),
        "best_confidence_based": worst,
        "confidence_based_within_1pt_of_floor": worst is None or worst["balanced_accuracy"] <= floor + 0.01,
        "max_tpr_at_01pct_fpr": max_tpr,
    }


SPLIT_ROLES = ("target_train", "eval_nonmember", "shadow_in", "shadow_out")


def _load_sets(config: AuditConfig, bundle: Any) -> _Sets:
    """The audit's records: the bundle's own dataset and split, or ``config.split_file`` over ``config.dataset``."""
    t = bundle.manifest.training
    if config.split_file is None:
        if "split" not in t or "split.npz" not in bundle.manifest.files:
            raise ValueError("this bundle records no split (a user's model from `export`): pass --dataset, --data "
                             "and --split-file with the records to audit (target_train, eval_nonmember, shadow_in, "
                             "shadow_out)")  # fmt: skip
        data_path = t["config"].get("data_path")
        data = load_dataset(t["config"]["dataset"], Path(data_path) if data_path else None)
        if data.sha256 != t["dataset"]["sha256"]:
            raise ValueError("the dataset on disk differs from the one the bundle was trained on (sha256 mismatch)")
        with np.load(bundle.path("split.npz")) as f:
            return _Sets(data, {k: f[k] for k in f.files})
    if config.dataset is None:
        raise ValueError("--split-file needs --dataset (and --data for datasets that are not bundled)")
    data = load_dataset(config.dataset, config.data_path)
    parts = Split.load(config.split_file).parts
    if missing := [r for r in SPLIT_ROLES if r not in parts]:
        raise ValueError(f"{config.split_file} lacks the roles {missing} (it has {sorted(parts)})")
    if max(int(v.max(initial=-1)) for v in parts.values()) >= len(data.y):
        raise ValueError(f"{config.split_file} indexes rows beyond the {len(data.y)} rows of {data.name}")
    return _Sets(data, parts)


def run_audit(config: AuditConfig) -> AuditResult:
    started = time.perf_counter()
    bundle = load_bundle(config.bundle)
    m = bundle.manifest
    t = m.training
    unknown = [a for a in config.attacks if a not in available_attacks()]
    unknown += [a for a in config.label_only if a not in LABEL_ONLY]
    unknown += [v for v in config.views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown attack or view {unknown}; attacks: {available_attacks()}, label-only: "
                         f"{list(LABEL_ONLY)}, views: {list(VIEWS)}")  # fmt: skip
    sets = _load_sets(config, bundle)
    data = sets.data
    (X_in, y_in), (X_out, y_out) = sets.rows("target_train"), sets.rows("eval_nonmember")
    defended = config.defense != "none" or config.url is not None
    defend = _AttackerDefense(bundle, config.defense, config.defense_params) if config.defense != "none" else None

    raw = RawOnnxPredictor(config.bundle)
    clean = raw.predict(X_in), raw.predict(X_out)
    predictor = _open_predictor(config, raw)
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    notes: dict[str, str] = {}
    per_class: dict[str, dict[int, float]] = {}
    repeat_proof = None
    attacker: dict[str, Any] = {"source": "real", "queries_to_target": 0}
    try:
        released = clean if predictor is raw else (predictor.predict(X_in), predictor.predict(X_out))
        if predictor is not raw:  # the same queries again: keyed noise must give the same answers
            again = predictor.predict(X_in[:200])
            repeat_proof = float((np.abs(again - released[0][:200]).max(axis=1) == 0).mean())
        if config.attacker_data != "real":
            from defense_models.attacker_data import attacker_records

            records = attacker_records(config.attacker_data, sets.rows("shadow_in"), sets.rows("shadow_out"),
                                       predictor.predict, seed=config.seed, **config.attacker_data_params)  # fmt: skip
            sets.shadow = {"shadow_in": (records.X_in, records.y_in), "shadow_out": (records.X_out, records.y_out)}
            attacker = records.summary(config.attacker_data)
        shadow = _shadow_model(m, sets, config)
        predict_shadow = _softmax_predict(shadow)
        shadow_p = predict_shadow(sets.rows("shadow_in")[0]), predict_shadow(sets.rows("shadow_out")[0])
        views = _views(config, predictor, defend, sets, shadow_p, released)
        for name in config.label_only:
            if name == "noise_robustness" and not data.binary:
                continue  # it flips binary features
            key = f"label-only/{name}"
            results[key], scores[key] = _label_only(config, name, predictor, predict_shadow, sets, released)
            notes["label-only"] = "label queries only, within a per-row query budget"
    finally:
        close = getattr(predictor, "close", None)
        if close is not None and predictor is not raw:
            close()

    bar = tqdm(total=len(views) * len(config.attacks), desc="attacks", disable=not config.progress, leave=False)
    fitted: dict[tuple[int, str], Any] = {}  # views that train on the same data share the fitted attack
    for view_name, view in views.items():
        notes[view_name] = view.note
        for name in config.attacks:
            bar.set_postfix_str(f"{view_name}/{name}")
            t0 = time.perf_counter()
            if (id(view.train), name) not in fitted:
                attack = create_attack(name, **config.attack_options.get(name, {}))
                attack.fit(*view.train)
                fitted[(id(view.train), name)] = attack
            attack = fitted[(id(view.train), name)]
            on = view.calibrate or view.train
            calib = (attack.score(on[0]), attack.score(on[1]))
            pair = attack.score(view.test[0]), attack.score(view.test[1])
            sign = -1.0 if view.orient and auc(*calib) < 0.5 else 1.0
            calib, pair = (sign * calib[0], sign * calib[1]), (sign * pair[0], sign * pair[1])
            s = score_attack(*pair, shadow=calib)
            key = f"{view_name}/{name}"
            results[key] = {**s.as_dict(), "seconds": round(time.perf_counter() - t0, 1)}
            if view.orient:
                results[key]["orientation"] = sign
            scores[key] = pair
            per_class[key] = _per_class(*pair, view.test[0].labels, view.test[1].labels, s.threshold)
            bar.update()
    bar.close()
    if config.lira_shadows is not None:
        for key, (res, pair) in _lira(config, sets, released, defend).items():
            results[f"reference/{key}"], scores[f"reference/{key}"] = res, pair
        notes["reference"] = "LiRA on reference models trained on random halves of the evaluation pool"

    train_acc, test_acc = accuracy(released[0], y_in), accuracy(released[1], y_out)
    floor = gap_floor(train_acc, test_acc)
    both_clean, both_released = np.concatenate(clean), np.concatenate(released)
    report = {
        "bundle": {"name": m.name, "version": m.version, "replacement": t.get("replacement", {}).get("kind")},
        "target": config.url or f"in-process gateway ({config.defense})",
        "defense": config.defense,
        "defense_params": config.defense_params,
        "defended": defended,
        "views": notes,
        "attacker_data": {**attacker, "params": config.attacker_data_params},
        "utility": {
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
            "undefended_test_accuracy": accuracy(clean[1], y_out),
            "label_only_floor": floor,
            "label_loss": label_loss(both_released, both_clean),
            "l1": l1_stats(both_released, both_clean),
            "l1_members": l1_stats(released[0], clean[0]),
            "l1_nonmembers": l1_stats(released[1], clean[1]),
            "exact_repeats_identical": repeat_proof,
        },
        "attacks": results,
        "per_class_balanced_accuracy": per_class,
        "summary": _summary(results, floor),
        "sets": {
            "members": len(y_in),
            "nonmembers": len(y_out),
            "shadow_in": len(sets.rows("shadow_in")[1]),
            "shadow_out": len(sets.rows("shadow_out")[1]),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    return AuditResult(report, scores, clean, released, (y_in, y_out))


__all__ = ["DEFAULT_ATTACKS", "LABEL_ONLY", "VIEWS", "AuditConfig", "AuditResult", "available_attacks", "run_audit"]
