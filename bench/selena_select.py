"""Choose SELENA's distillation on the defender's own rows: its members against validation rows.

The audit scores the target's members (``target_train``) against the evaluation non-members; choosing a
variant on those rows would tune the defense to its own exam. This benchmark keeps them out: for each variant
(``--replacement-param`` overrides on top of ``--base``) it distills the target from its cached sub-models and
each LiRA reference from its own (``shadows``' cache layout, ``CACHE/shadow_j``), then scores the members
against the ``validation`` rows, which neither the target nor any reference trained on, with offline LiRA on
those references and the plain logit-confidence threshold. (Online LiRA is left out: no reference trains on a
validation row, so those rows would be scored against the global IN mean and the members against their own.)
Each variant's references are real ``shadows`` (``train_shadows``, so a rerun reuses them) in
``--refs-out``/``selena-<params>``: the variant the audit then takes uses them as its ``lira_shadows`` as
they are, and what was scored here is what LiRA loads there. A sub-model missing from a cache is trained
there first: run the plan's ``prepare`` before this.

    python bench/selena_select.py --cache artifacts/location30-selena-sub \\
        --refs-cache artifacts/location30-selena-refs-sub --count 16 --base distill_on=both \\
        --variant "" --variant distill_weight_decay=1e-3 --variant distill_epochs=20

Prints, per variant: train and validation accuracy, and for each attack its AUC and TPR at 1% FPR (Location30
has 510 validation rows: 0.1% FPR is below their resolution, so the tail is read at 1%). Writes
``reports/selena_select.json``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from defense_models.audit.attacks.lira import Lira, logit_confidence  # noqa: E402
from defense_models.audit.scoring import auc, tpr_at_fpr  # noqa: E402
from defense_models.audit.sweep import parse_value  # noqa: E402
from defense_models.training.data import Dataset, Split  # noqa: E402
from defense_models.training.nets import predict_probs  # noqa: E402
from defense_models.training.recipes import TrainConfig, dataset_and_split, recipe  # noqa: E402
from defense_models.training.replacements import replacement_context, role_rows, train_replacement  # noqa: E402
from defense_models.training.shadows import ShadowSpec, load_shadows, train_shadows  # noqa: E402


@dataclass(frozen=True)
class Setup:
    config: TrainConfig
    data: Dataset
    split: Split
    members: tuple[torch.Tensor, torch.Tensor]  # target_train
    validation: tuple[torch.Tensor, torch.Tensor]


def parse_params(text: str) -> dict[str, Any]:
    """'k=v,k=v' -> {k: v}, numbers parsed as ``--replacement-param`` parses them (the shadows' request
    must equal the one ``shadows`` would record, or it refuses the directory)."""
    return {key: parse_value(value) for key, value in (item.split("=", 1) for item in text.split(",") if item)}


def softmax_on(model: torch.nn.Module, X: torch.Tensor) -> np.ndarray:
    return predict_probs(model, X).numpy()  # [N, C] float64


def target_phi(setup: Setup, params: dict[str, Any], cache: str) -> tuple[np.ndarray, float, float]:
    """The distilled target's φ [members + validation], train and validation accuracy."""
    arch, fit_config = recipe(setup.config, setup.data)
    ctx = replacement_context(setup.config, setup.data, setup.split, arch, fit_config, setup.members, setup.config.seed)
    model, _ = train_replacement("selena", ctx, {**params, **where(cache)})
    X = torch.cat([setup.members[0], setup.validation[0]])
    y = torch.cat([setup.members[1], setup.validation[1]]).numpy()
    probs = softmax_on(model, X)  # [N + V, C]
    right = probs.argmax(axis=1) == y
    members = len(setup.members[1])
    return logit_confidence(probs, y), float(right[:members].mean()), float(right[members:].mean())


def where(cache: str, own_of: str = "") -> dict[str, str]:
    """The SELENA cache parameters: the sub-models in ``cache``; the reference set's own teachers
    (``reference_teachers=own``, no member among them) in ``own_of``/reference_teachers, shared by the target
    and every reference (default ``cache``'s)."""
    return {"cache": cache, "reference_cache": str(Path(own_of or cache) / "reference_teachers")}


def reference_phi(setup: Setup, params: dict[str, Any], cache: str, count: int, refs_out: Path,
                  own_of: str) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """φ [count, members + validation] of the distilled references and their IN masks (validation: never IN).

    The references are ``shadows``' own (``train_shadows`` into ``refs_out``, which skips those already
    there): the set scored here is the set the audit's LiRA loads with ``lira_shadows = refs_out``."""
    config = replace(setup.config, replacement="selena", replacement_params={**params, **where(cache, own_of)})
    train_shadows(config, ShadowSpec(count), refs_out)
    shadows = load_shadows(refs_out, setup.data)[:count]
    members = len(setup.members[1])
    if shadows[0][1].pool_rows[:members] != setup.split.parts["target_train"].tolist():
        raise ValueError("the references' pool must start with the target's members")
    X = torch.cat([setup.members[0], setup.validation[0]])
    y = torch.cat([setup.members[1], setup.validation[1]]).numpy()
    phis = [logit_confidence(softmax_on(model, X), y) for model, _ in shadows]
    never = np.zeros(len(setup.validation[1]), bool)
    masks = [np.concatenate([np.asarray(meta.in_mask[:members]), never]) for _, meta in shadows]
    return np.stack(phis), np.stack(masks)


def refs_dir(root: Path, params: dict[str, Any]) -> Path:
    """One ``shadows`` directory per variant: ``root/selena-k=v-k=v`` (sorted keys)."""
    return root / "-".join(["selena", *(f"{k}={params[k]}" for k in sorted(params))])


def attacks(phi: np.ndarray, ref_phi: np.ndarray, ref_in: np.ndarray, members: int) -> dict[str, dict[str, float]]:
    """AUC and TPR@1% FPR of each attack, members (the first ``members`` rows) against the rest."""
    lira = Lira(online=False)  # online LiRA would read validation rows (never IN) off the global IN mean
    lira.fit(ref_phi, ref_in)
    scores = {"threshold": phi, "lira_offline": lira.score(phi)}
    return {name: {"auc": auc(s[:members], s[members:]), "tpr_at_1pct": tpr_at_fpr(s[:members], s[members:], 0.01)}
            for name, s in scores.items()}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="location30")
    ap.add_argument("--cache", required=True, help="the target's SELENA sub-models")
    ap.add_argument("--refs-cache", required=True, help="the references' SELENA sub-models (CACHE/shadow_j)")
    ap.add_argument("--count", type=int, default=16, help="references")
    ap.add_argument("--base", default="", help="k=v,... every variant starts from")
    ap.add_argument("--variant", action="append", default=[], help="k=v,... on top of --base ('' = base)")
    ap.add_argument("--refs-out", type=Path, default=ROOT / "artifacts" / "selena-select",
                    help="each variant's references are shadows in REFS_OUT/selena-<params> (kept, reused)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "selena_select.json")
    args = ap.parse_args()
    config = TrainConfig(dataset=args.dataset, progress=False)
    data, split = dataset_and_split(config)
    setup = Setup(config, data, split, role_rows(data, split, "target_train"), role_rows(data, split, "validation"))
    rows = []
    print(f"{'variant':<42} {'train':>6} {'val':>6} {'attack':>13} {'AUC':>6} {'TPR@1%':>7}")
    for text in args.variant or [""]:
        params = {**parse_params(args.base), **parse_params(text)}
        phi, train_acc, val_acc = target_phi(setup, params, args.cache)
        ref_phi, ref_in = reference_phi(setup, params, args.refs_cache, args.count,
                                        refs_dir(args.refs_out, params), own_of=args.cache)
        result = attacks(phi, ref_phi, ref_in, len(setup.members[1]))
        rows.append({"variant": text or "(base)", "params": params, "train": train_acc, "validation": val_acc,
                     "attacks": result})  # fmt: skip
        for name, r in result.items():
            print(f"{text or '(base)':<42} {train_acc:6.3f} {val_acc:6.3f} {name:>13} {r['auc']:6.3f} "
                  f"{r['tpr_at_1pct']:7.1%}", flush=True)  # fmt: skip
    write_record(args.out, "bench/selena_select.py", base=args.base, references=args.count, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
