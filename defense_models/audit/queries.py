"""Attacks that query the target or train reference models: label-only attacks and LiRA."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from defense_models.audit.attacks.label_only import LABEL_ONLY_ATTACKS
from defense_models.audit.attacks.lira import LabelLira, Lira, logit_confidence
from defense_models.audit.config import AuditConfig
from defense_models.audit.predictors import Predictor
from defense_models.audit.schema import AttackResult, MetricsProbe, TimingProbe
from defense_models.audit.scoring import accuracy, gap_floor, score_attack
from defense_models.audit.views import Arrays, AttackerDefense, Predict, Sets, softmax_predict
from defense_models.training.shadows import ShadowMeta, load_shadows


def label_only_attack(config: AuditConfig, name: str, predictor: Predictor, shadow_predict: Predict, sets: Sets,
                      released: Arrays) -> tuple[AttackResult, Arrays] | None:  # fmt: skip
    """One label-only attack on ``label_only_rows`` members and non-members; None where it does not apply."""
    attack = LABEL_ONLY_ATTACKS.get(name).for_audit(config, sets.data)
    if attack is None:
        return None
    n = config.label_only_rows
    roles = ("shadow_in", "shadow_out", "target_train", "eval_nonmember")
    rows = {r: tuple(a[:n] for a in sets.rows(r)) for r in roles}
    calib = attack.fit(shadow_predict, *rows["shadow_in"], *rows["shadow_out"])  # shadow scores: the threshold
    before = attack.queries
    s = attack.score(predictor.predict, *rows["target_train"]), attack.score(predictor.predict, *rows["eval_nonmember"])
    spent = attack.queries - before
    (_, y_in), (_, y_out) = rows["target_train"], rows["eval_nonmember"]
    floor = gap_floor(accuracy(released[0][:n], y_in), accuracy(released[1][:n], y_out))  # on these rows
    result = AttackResult(**score_attack(*s, shadow=calib).as_dict(), **attack.record(), queries_to_target=spent,
                          queries_per_row=spent / (2 * len(y_in)), label_only_floor_on_rows=floor)  # fmt: skip
    return result, s


def lira(config: AuditConfig, sets: Sets, released: Arrays,
         defend: AttackerDefense | None) -> dict[str, tuple[AttackResult, Arrays]]:  # fmt: skip
    """LiRA online and offline with reference models from ``defense_models shadows`` (``config.lira_shadows``)."""

    assert config.lira_shadows is not None
    refs = load_shadows(config.lira_shadows, sets.data)
    check_references([meta for _, meta in refs], config.lira_shadows)
    pool = np.asarray(refs[0][1].pool_rows)
    position = {int(r): i for i, r in enumerate(pool)}
    members, nonmembers = sets.parts["target_train"], sets.parts["eval_nonmember"]
    missing = [r for r in np.concatenate([members, nonmembers]) if int(r) not in position]
    if missing or refs[0][1].dataset_sha256 != sets.data.sha256:
        raise ValueError(
            "the reference models were not trained on this bundle's evaluation records "
            "(train them with `defense_models shadows` and the bundle's dataset, split and seed)"
        )
    idx = np.array([position[int(r)] for r in np.concatenate([members, nonmembers])])  # pool positions
    X, y = sets.data.X[pool[idx]], sets.data.y[pool[idx]]  # only the audited records: each costs a defense
    phi, masks, right = [], [], []
    for model, meta in tqdm(refs, desc="LiRA references", disable=not config.progress, leave=False):
        predict = softmax_predict(model.eval())
        p = predict(X)  # [N_members + N_nonmembers, C]
        if defend is not None:  # the adaptive attacker defends its reference outputs too (with that model)
            p = defend(p, model=predict)
        phi.append(logit_confidence(p, y))
        right.append(p.argmax(axis=1) == y)
        masks.append(np.asarray(meta.in_mask, bool)[idx])
    phi_refs, in_refs = np.stack(phi), np.stack(masks)  # [K, N_members + N_nonmembers]
    y_eval = sets.data.y[np.concatenate([members, nonmembers])]
    target_phi = logit_confidence(np.concatenate(released), y_eval)
    copied = {"reference_models": len(refs), "reference_replacement": _replacement_of(refs)}
    out = {}
    for online in (True, False):
        attack = Lira(online=online)
        attack.fit(phi_refs, in_refs)
        s = attack.score(target_phi)
        pair = s[: len(members)], s[len(members) :]
        calib = Lira.leave_one_out(phi_refs, in_refs, online)
        out["lira_online" if online else "lira_offline"] = (
            AttackResult(**score_attack(*pair, shadow=calib).as_dict(), **copied),
            pair,
        )
    label = LabelLira()
    label.fit(np.stack(right), in_refs)
    s = label.score(np.concatenate(released).argmax(axis=1) == y_eval)
    pair = s[: len(members)], s[len(members) :]
    calib = LabelLira.leave_one_out(np.stack(right), in_refs)
    out["lira_label"] = AttackResult(**score_attack(*pair, shadow=calib).as_dict(), **copied), pair
    return out


def check_references(metas: list[ShadowMeta], directory: object) -> None:
    """Enough reference models, and all that ``shadows`` was asked for (an unfinished shard fails loudly)."""
    if len(metas) < 4:
        raise ValueError(f"LiRA needs at least 4 reference models in {directory}, found {len(metas)}")
    if len(metas) < (count := max(meta.count for meta in metas)):
        raise ValueError(f"{directory} holds {len(metas)} of the {count} reference models `shadows` was asked "
                         "for: finish the missing shards (the same command) before the audit")  # fmt: skip


def _replacement_of(refs: list[tuple[torch.nn.Module, ShadowMeta]]) -> str:
    """What the references were trained as: "none" (plain), or a replacement with its parameters."""
    kinds = {meta.request.model_dump_json() for _, meta in refs}
    if len(kinds) > 1:
        raise ValueError(f"LiRA's reference models mix trainings ({sorted(kinds)}): one kind per directory")
    request = refs[0][1].request
    params = ", ".join(f"{k}={v}" for k, v in request.params.items())
    return request.kind + (f" ({params})" if params else "")


# --- the scraper attacker ------------------------------------------------------------------------------------
L1_HISTOGRAM = "gateway_defense_l1_distortion"


def _l1_buckets(text: str) -> dict[float, float]:
    """Prometheus text -> {upper bound: cumulative count} of the L1 histogram (summed over defenses)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == L1_HISTOGRAM:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    out[le] = out.get(le, 0.0) + sample.value
    return out


def _landed(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest upper bound whose count grew: the L1 bucket of the one row queried in between (0: none)."""
    grew = [le for le in sorted(after) if after[le] > before.get(le, 0.0)]
    return grew[0] if grew else 0.0


def metrics_probe(config: AuditConfig, predictor: Predictor, sets: Sets) -> MetricsProbe:
    """Play the client who scrapes /metrics around its own single-row queries (a membership oracle wherever
    clients can read per-row distortion metrics). Scored at the best threshold on these rows, either orientation."""
    scrape = getattr(predictor, "scrape", None)
    status = scrape()[0] if scrape is not None else 404
    if scrape is None or status != 200:
        return MetricsProbe(status=status, reachable=False)
    n = config.metrics_probe_rows
    scores = []
    for role in ("target_train", "eval_nonmember"):
        landed = []
        for x in sets.rows(role)[0][:n]:
            before = _l1_buckets(scrape()[1])
            predictor.predict(x[None, :])
            landed.append(_landed(before, _l1_buckets(scrape()[1])))
        scores.append(np.asarray(landed))
    auc, bacc = _better_orientation(scores[0], scores[1])
    return MetricsProbe(status=200, reachable=True, rows=n, auc=auc, balanced_accuracy=bacc)


def _better_orientation(members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, float]:
    """(AUC, balanced accuracy at the best threshold) of a score, in whichever direction separates better: the
    attacker's best case on these rows."""
    s = score_attack(members, nonmembers)
    best = score_attack(-members, -nonmembers) if s.auc < 0.5 else s
    return best.auc, best.oracle_balanced_accuracy


def timing_probe(config: AuditConfig, predictor: Predictor, sets: Sets) -> TimingProbe:
    """Play the client who times its own single-row queries: members and non-members interleaved, each queried
    ``timing_probe_repeats`` times, scored on the fastest of its answers (the least noisy estimate of the work
    done for it). With ``timing_probe_copies`` > 1 each query carries that many copies of the row, which
    multiplies the work that depends on it. Against an HTTP endpoint this is what a client measures; in
    process, the defense's compute time without network noise (the attacker's best case)."""
    n, repeats, copies = config.timing_probe_rows, config.timing_probe_repeats, config.timing_probe_copies
    (X_in, _), (X_out, _) = sets.rows("target_train"), sets.rows("eval_nonmember")
    X_in, X_out = X_in[:n], X_out[:n]
    predictor.predict(X_out[:1])  # warm the connection and the code paths
    fastest = np.full((2, len(X_in)), np.inf)  # [member?, row]
    for _ in range(repeats):
        for i in range(len(X_in)):
            for side, X in enumerate((X_in, X_out)):
                query = np.repeat(X[i : i + 1], copies, axis=0)  # copies of one row amplify its work
                start = time.perf_counter()
                predictor.predict(query)
                fastest[side, i] = min(fastest[side, i], time.perf_counter() - start)
    auc, bacc = _better_orientation(fastest[0], fastest[1])
    null = _shuffled_aucs(fastest, np.random.default_rng(config.seed))
    return TimingProbe(rows=len(X_in), repeats=repeats, copies=copies, over_http=config.url is not None, auc=auc,
                       balanced_accuracy=bacc, noise_auc_95=float(np.quantile(null, 0.95)),
                       p_value=float((1 + (null >= auc).sum()) / (1 + len(null))),
                       member_median_ms=float(np.median(fastest[0]) * 1e3),
                       nonmember_median_ms=float(np.median(fastest[1]) * 1e3))  # fmt: skip


def _shuffled_aucs(scores: np.ndarray, rng: np.random.Generator, rounds: int = 1000) -> np.ndarray:
    """The better-orientation AUC of ``scores`` [2, n] with the member/non-member labels shuffled ``rounds`` times:
    what latency that does not depend on membership scores on these rows (the noise level of ``auc``)."""
    n = scores.shape[1]
    pooled_ranks = scores.ravel().argsort().argsort() + 1  # [2n] ranks 1..2n; shuffling labels permutes them
    ranks = np.empty((rounds, 2 * n))
    for r in range(rounds):
        ranks[r] = rng.permutation(pooled_ranks)
    auc = (ranks[:, :n].sum(axis=1) - n * (n + 1) / 2) / (n * n)  # Mann-Whitney U / n², first half as members
    return np.maximum(auc, 1 - auc)
