"""Condense sweep results into the tables of docs/RESULTS.md.

    python bench/summarize.py reports/location30/sweep.json [--extra reports/location30-flipped/sweep.json]
    python bench/summarize.py reports/location30-replacements/sweep.json --goals plain

``--goals BASELINE`` prints issue 15's table instead: train and test accuracy (and the change from the
BASELINE setting's), the best attack of the whole suite, the largest TPR at 0.1% FPR of any attack (with that
attack's 95% bootstrap interval, in reports that have one), and the verdicts: test ≥ baseline − 3 points,
best ≤ 0.60 and TPR@0.1% ≤ 1% (alone), best ≤ 0.56 and label loss 0 (with MemGuard on top).

``--plot PNG --pick SHORT=SETTING ...`` draws the privacy-vs-utility panels (test accuracy against the best
attack and against the largest TPR at 0.1% FPR) for the picked settings only, each under its short name, with
the goals as dashed lines when ``--goals`` names the baseline (it prints no table then). Picks with the same
short name are one series (e.g. three trainings of a recipe):

    python bench/summarize.py reports/location30-selena-heldout/sweep.json --goals plain \
        --plot docs/results/location30-selena-heldout/frontier.png --pick "plain=plain" --pick "..."

Prints one Markdown row per setting: utility, the label-only floor, MemGuard's NN attack (shadow and
adaptive views), the best attack of each family, and the goals' verdicts. ``--extra`` sweeps add their
attacks to the settings with the same label (e.g. the flipped view run separately).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from defense_models.audit.schema import Sweep, SweepRow, read

FAMILIES = {
    "label-only": lambda k: k.startswith("label-only/"),
    "LiRA": lambda k: k.startswith("reference/"),
    "vector, other views": lambda k: (
        k.split("/")[0] in ("adaptive", "flipped", "known", "rounded", "repeated") and not k.endswith("/gap")
    ),
    "vector, shadow": lambda k: k.startswith("shadow/") and not k.endswith("/gap"),
}


def _best(attacks: dict[str, Any], keep: Any) -> tuple[str, dict[str, Any]] | None:
    keys = [k for k in attacks if keep(k)]
    if not keys:
        return None
    k = max(keys, key=lambda k: attacks[k]["balanced_accuracy"])
    return k, attacks[k]


def _cell(best: tuple[str, dict[str, Any]] | None) -> str:
    if best is None:
        return "—"
    k, r = best
    return f"{r['balanced_accuracy']:.3f} ({k.split('/', 1)[1]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--extra", type=Path, action="append", default=[])
    parser.add_argument(
        "--by-view",
        action="store_true",
        help="a column per attacker view (its best confidence-based attack) and the cost to users",
    )
    parser.add_argument("--goals", metavar="BASELINE", help="issue 15's table, accuracy against this setting's")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="privacy vs utility of the --pick settings")
    parser.add_argument("--pick", action="append", default=[], metavar="SHORT=SETTING",
                        help="a setting to plot, under a short name (repeatable, in legend order)")  # fmt: skip
    args = parser.parse_args()
    if args.plot:
        plot(read(Sweep, args.sweep).rows, args.pick, args.plot, args.goals)
        return
    rows = [r.model_dump() for r in read(Sweep, args.sweep).rows]
    for extra in args.extra:
        by_label = {r.setting: r for r in read(Sweep, extra).rows}
        for r in rows:
            if r["setting"] in by_label:
                r["attacks"].update(by_label[r["setting"]].attacks)
    if args.by_view:
        by_view(rows)
        return
    if args.goals:
        goals(rows, args.goals)
        return
    print("| setting | test acc. | label loss | mean L1 | floor | NN, shadow / adaptive | best vector attack, "
          "shadow | best vector attack, other views | LiRA | label-only | max TPR@0.1% FPR |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---|---|---|---|---:|")
    for r in rows:
        a = r["attacks"]
        nn = "/".join(f"{a[k]['balanced_accuracy']:.3f}" if k in a else "—"
                      for k in ("shadow/nn_sorted", "adaptive/nn_sorted"))  # fmt: skip
        tpr = max((v["tpr_at_01pct_fpr"] for v in a.values()), default=0.0)
        cells = [_cell(_best(a, FAMILIES[f])) for f in ("vector, shadow", "vector, other views", "LiRA",
                                                         "label-only")]  # fmt: skip
        print(f"| {r['setting']} | {r['test_accuracy']:.3f} | {r['label_loss']:.3f} | {r['mean_l1']:.3f} | "
              f"{r['label_only_floor']:.3f} | {nn} | " + " | ".join(cells) + f" | {tpr:.3f} |")  # fmt: skip


VIEW_COLUMNS = ("shadow", "adaptive", "flipped", "known", "repeated", "reference")
LABEL_LIRA = "reference/lira_label"


def by_view(rows: list[dict[str, Any]]) -> None:
    """Per setting: the best confidence-based attack in each view (LiRA: "reference"), the worst of them next
    to the floor, the largest TPR at 0.1% FPR of those attacks and of label-only LiRA (what the label alone
    gives), and what the released vectors cost users."""
    print("| setting | floor | " + " | ".join("LiRA" if v == "reference" else v for v in VIEW_COLUMNS)
          + " | worst − floor | max TPR@0.1% (label-only LiRA) | top-5 acc. | ECE (undefended) | NLL (undefended) "
          "| near repeats | mean L1 |")  # fmt: skip
    print("|---|---:|" + "---:|" * (len(VIEW_COLUMNS) + 7))
    for r in rows:
        a, u = r["attacks"], r["utility"] or {}
        confidence = {k: v for k, v in a.items() if not k.endswith("/gap") and k != LABEL_LIRA}
        best = {v: max((x["balanced_accuracy"] for k, x in confidence.items() if k.startswith(v + "/")), default=None)
                for v in VIEW_COLUMNS}  # fmt: skip
        worst = max((b for b in best.values() if b is not None), default=r["label_only_floor"])
        tpr = max((x["tpr_at_01pct_fpr"] for x in confidence.values()), default=0.0)
        label = f" ({a[LABEL_LIRA]['tpr_at_01pct_fpr']:.1%})" if LABEL_LIRA in a else ""
        cells = ["—" if best[v] is None else f"{best[v]:.3f}" for v in VIEW_COLUMNS]
        cost = (f"{u.get('top5_accuracy', 0):.3f} | {u.get('ece', 0):.3f} ({u.get('undefended_ece', 0):.3f}) | "
                f"{u.get('nll', 0):.2f} ({u.get('undefended_nll', 0):.2f})")  # fmt: skip
        near = "—" if u.get("near_repeats_agree") is None else f"{u['near_repeats_agree']:.0%}"
        tail = f" | {worst - r['label_only_floor']:+.3f} | {tpr:.1%}{label} | {cost} | {near} | {r['mean_l1']:.3f} |"
        print(f"| {r['setting']} | {r['label_only_floor']:.3f} | " + " | ".join(cells) + tail)


def plot(rows: list[SweepRow], picks: list[str], out: Path, baseline: str | None) -> None:
    """The picked rows (``SHORT=SETTING``), renamed, on the two privacy-vs-utility panels; issue 15's goals
    relative to ``baseline``'s test accuracy as dashed lines."""
    from defense_models.audit.sweep import Goals, plot_privacy_utility

    by_label = {r.setting: r for r in rows}
    named = [_split_pick(pick, by_label) for pick in picks]
    missing = [pick for pick, n in zip(picks, named, strict=True) if n is None]
    if not picks or missing:
        raise SystemExit(f"--plot needs --pick SHORT=SETTING with settings of the sweep; not found: {missing}")
    picked = [by_label[setting].model_copy(update={"setting": short}) for short, setting in filter(None, named)]
    goals = None if baseline is None else Goals(by_label[baseline].test_accuracy - 0.03, 0.60, 0.01)
    plot_privacy_utility(picked, out, goals)
    print(f"written to {out}")


def _split_pick(pick: str, settings: dict[str, Any]) -> tuple[str, str] | None:
    """(SHORT, SETTING) of ``SHORT=SETTING`` at the first "=" after which a setting of the sweep follows (both
    names may hold "="), or None."""
    cuts = [i for i, c in enumerate(pick) if c == "="]
    return next(((pick[:i], pick[i + 1:]) for i in cuts if pick[i + 1:] in settings), None)


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _interval(attack: dict[str, float]) -> str:
    """' [low–high]': the TPR@0.1% FPR's 95% bootstrap interval, in sweeps audited since it is reported."""
    if "tpr_at_01pct_fpr_low" not in attack:
        return ""
    return f" [{attack['tpr_at_01pct_fpr_low']:.1%}–{attack['tpr_at_01pct_fpr_high']:.1%}]"


def goals(rows: list[dict[str, Any]], baseline: str) -> None:
    """Issue 15's verdicts per setting (a setting with MemGuard on top is judged by the stricter goal)."""
    base = next(r for r in rows if r["setting"] == baseline)["test_accuracy"]
    print("| setting | train acc. | test acc. (Δ) | floor | best attack, whole suite | best LiRA | best label-only "
          "| max TPR@0.1% FPR (attack) | test ≥ base − 3 pts | best ≤ goal | TPR ≤ 1% |")  # fmt: skip
    print("|---|---:|---:|---:|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["attacks"]
        best_key = max(a, key=lambda k: a[k]["balanced_accuracy"])
        tpr_key = max(a, key=lambda k: a[k]["tpr_at_01pct_fpr"])
        best, tpr = a[best_key]["balanced_accuracy"], a[tpr_key]["tpr_at_01pct_fpr"]
        ceiling = 0.56 if r["defense"] == "memguard" else 0.60
        label_ok = r["label_loss"] == 0 or r["defense"] != "memguard"
        goal = f"≤ {ceiling:.2f}" + (", label loss 0" if r["defense"] == "memguard" else "")
        print(f"| {r['setting']} | {r['train_accuracy']:.3f} | {r['test_accuracy']:.3f} "
              f"({r['test_accuracy'] - base:+.3f}) | {r['label_only_floor']:.3f} | {best:.3f} ({best_key}) | "
              f"{_cell(_best(a, FAMILIES['LiRA']))} | {_cell(_best(a, FAMILIES['label-only']))} | "
              f"{tpr:.1%}{_interval(a[tpr_key])} ({tpr_key}) | {_mark(r['test_accuracy'] >= base - 0.03)} | "
              f"{_mark(best <= ceiling and label_ok)} ({goal}) | "
              f"{_mark(tpr <= 0.01)} |")  # fmt: skip


if __name__ == "__main__":
    main()
