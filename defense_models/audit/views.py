"""Attacker views: what each attacker knows, trains on and scores (``VIEWS``).

``shadow`` and ``known`` need no copy of the defense; ``adaptive``, ``flipped``, ``rounded`` and
``repeated`` use the attacker's own copy of it (``AttackerDefense``: same bundle and parameters, its
own secret), which goes through the gateway's public release path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from defense_models.audit.attacks import AttackData
from defense_models.audit.config import VIEWS, AuditConfig
from defense_models.audit.predictors import Predictor
from defense_models.audit.scoring import balanced_accuracy_at
from defense_models.training.nets import predict_probs

PER_CLASS_MIN_ROWS = 10  # per-class accuracies only for classes with this many members and non-members


@dataclass
class Sets:
    data: Any
    parts: dict[str, np.ndarray]
    #: The attacker's own records for shadow_in / shadow_out (from ``attacker_data``), if not the split's.
    shadow: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def rows(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        if role in self.shadow:
            return self.shadow[role]
        return self.data.X[self.parts[role]], self.data.y[self.parts[role]]


Predict = Callable[[np.ndarray], np.ndarray]  # X [N, D] -> probabilities [N, C]


def softmax_predict(model: torch.nn.Module) -> Predict:
    def predict(X: np.ndarray) -> np.ndarray:
        return predict_probs(model, torch.from_numpy(np.asarray(X, np.float32))).numpy()

    return predict


class AttackerDefense:
    """The adaptive attacker's own copy of the defense (same bundle and parameters, its own secret).

    A defense that runs the model (``hamp``) runs the attacker's: ``use_model`` sets its shadow model, and
    a call may pass another (LiRA's reference models)."""

    def __init__(self, bundle: Any, name: str, params: dict[str, Any]) -> None:
        from gateway.defenses import create_defense

        self._defense = create_defense(name, bundle, params, torch.device("cpu"))
        self.features = int(bundle.manifest.input.width)
        self._model: Predict | None = None

    def use_model(self, predict: Predict) -> None:
        self._model = predict

    def __call__(self, probs: np.ndarray, secret: bytes = b"attacker's own secret",
                 model: Predict | None = None) -> np.ndarray:  # fmt: skip
        """What the gateway's release path makes of these outputs (of ``model``, default the shadow model)."""
        from gateway.pipeline import release_vectors

        predict = model or self._model
        bound = None if predict is None else (predict, self.features)
        return release_vectors(self._defense, probs, secret=secret, context=b"shadow", model=bound)


def round_vectors(probs: np.ndarray, decimals: int) -> np.ndarray:
    """The "rounded" attacker's pre-processing: round to ``decimals`` and renormalise (rows that round
    to all zeros stay as they were)."""
    r = np.round(probs, decimals)
    s = r.sum(axis=1, keepdims=True)
    return np.where(s > 0, r / np.where(s > 0, s, 1), probs)


# --- views: what each attacker trains on and what it scores -----------------------------------------
Arrays = tuple[np.ndarray, np.ndarray]  # (members' rows, non-members' rows)
Pair = tuple[AttackData, AttackData]


@dataclass(frozen=True)
class View:
    train: Pair  # what the attack model learns from
    test: Pair  # what it scores: evaluation members, non-members
    note: str
    calibrate: Pair | None = None  # where the attacker sets its threshold (default: train)
    orient: bool = False  # flip the score when it ranks the calibration members below non-members


def build_views(config: AuditConfig, predictor: Predictor, defend: AttackerDefense | None, sets: Sets,
           shadow: Predict, released: Arrays) -> dict[str, View]:  # fmt: skip
    """view name -> what the attacker trains on, scores and calibrates with."""
    y_sin, y_sout = sets.rows("shadow_in")[1], sets.rows("shadow_out")[1]
    y_in, y_out = sets.data.y[sets.parts["target_train"]], sets.data.y[sets.parts["eval_nonmember"]]
    target = (AttackData(released[0], y_in), AttackData(released[1], y_out))
    shadow_p = shadow(sets.rows("shadow_in")[0]), shadow(sets.rows("shadow_out")[0])
    views: dict[str, View] = {}
    raw = (AttackData(shadow_p[0], y_sin), AttackData(shadow_p[1], y_sout))
    if "shadow" in config.views:
        views["shadow"] = View(raw, target, "shadow model's outputs as they are")
    if "known" in config.views:
        rng = np.random.default_rng(config.seed)
        k_in = rng.random(len(y_in)) < config.known_fraction  # the records the attacker knows
        k_out = rng.random(len(y_out)) < config.known_fraction
        train = (AttackData(released[0][k_in], y_in[k_in]), AttackData(released[1][k_out], y_out[k_out]))
        test = (AttackData(released[0][~k_in], y_in[~k_in]), AttackData(released[1][~k_out], y_out[~k_out]))
        views["known"] = View(train, test, f"endpoint's outputs on {config.known_fraction:.0%} of the evaluation "
                               "records, scored on the rest")  # fmt: skip
    if defend is None:
        return views
    defend.use_model(shadow)
    views.update(_defense_aware_views(config, predictor, defend, sets, shadow, shadow_p, released, raw, target))
    return {v: views[v] for v in VIEWS if v in views}  # report in VIEWS order


def _defense_aware_views(
    config: AuditConfig, predictor: Predictor, defend: AttackerDefense, sets: Sets, shadow: Predict,
    shadow_p: Arrays, released: Arrays, raw: Pair, target: Pair,
) -> dict[str, View]:  # fmt: skip
    """The views that need the attacker's copy of the defense."""
    y_sin, y_sout = raw[0].labels, raw[1].labels
    y_in, y_out = target[0].labels, target[1].labels
    views: dict[str, View] = {}
    defended = (defend(shadow_p[0]), defend(shadow_p[1]))
    adaptive = (AttackData(defended[0], y_sin), AttackData(defended[1], y_sout))
    if "adaptive" in config.views:
        views["adaptive"] = View(adaptive, target, "shadow outputs passed through the same defense")
    if "flipped" in config.views:
        views["flipped"] = View(raw, target, "trained on raw shadow outputs; orientation and threshold set on "
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
        views["rounded"] = View(rounded_train, rounded_test, f"adaptive, every vector rounded to {d} decimals first")
    if "repeated" in config.views:
        rng = np.random.default_rng(config.seed + 1)
        r = config.repeats
        X_in, X_out = sets.rows("target_train")[0], sets.rows("eval_nonmember")[0]

        def jittered(X: np.ndarray) -> np.ndarray:
            copies = np.repeat(X, r, axis=0) + rng.uniform(-config.jitter, config.jitter, (len(X) * r, X.shape[1]))
            return copies.astype(np.float32)  # [N·r, D]

        def averaged(X: np.ndarray) -> np.ndarray:
            return predictor.predict(jittered(X)).reshape(len(X), r, -1).mean(axis=1)

        def shadow_averaged(X: np.ndarray) -> np.ndarray:  # the same queries against the attacker's own copy
            return defend(shadow(jittered(X))).reshape(len(X), r, -1).mean(axis=1)

        (S_in, _), (S_out, _) = sets.rows("shadow_in"), sets.rows("shadow_out")
        views["repeated"] = View(
            (AttackData(shadow_averaged(S_in), y_sin), AttackData(shadow_averaged(S_out), y_sout)),
            (AttackData(averaged(X_in), y_in), AttackData(averaged(X_out), y_out)),
            f"{r} queries per record, inputs jittered by ±{config.jitter:g} (each copy a new query), averaged",
        )
    return views


def per_class(members: np.ndarray, nonmembers: np.ndarray, y_in: np.ndarray, y_out: np.ndarray,
               tau: float) -> dict[int, float]:  # fmt: skip
    out = {}
    for c in np.union1d(y_in, y_out):
        m, n = members[y_in == c], nonmembers[y_out == c]
        if min(m.size, n.size) >= PER_CLASS_MIN_ROWS:
            out[int(c)] = balanced_accuracy_at(m, n, tau)
    return out
