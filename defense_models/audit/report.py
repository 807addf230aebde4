"""An audit's files: ``report.json``, ``report.md``, ``scores.npz`` and the plots.

Plots (matplotlib, Agg backend, imported only here):

* ``roc.png``: log-log ROC of every attack, one panel per attacker view;
* ``distributions.png``: members vs non-members, confidence on the true label and entropy, for the
  undefended and the released vectors (as in Nasr et al.'s figures);
* ``l1.png``: the defense's L1 distortion, members vs non-members;
* ``per_class_cdf.png``: CDF over classes of each attack's per-class balanced accuracy (AEPPT paper).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defense_models.audit.attacks.base import AttackData
from defense_models.audit.attacks.metric import confidence, neg_entropy
from defense_models.audit.run import AuditResult
from defense_models.audit.schema import AttackResult, AuditReport, write
from defense_models.audit.scoring import roc

PLOTS = ("roc.png", "distributions.png", "l1.png", "per_class_cdf.png")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _groups(keys: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split("/")[0], []).append(k)
    return groups


def plot_roc(result: AuditResult, path: Path) -> None:
    plt = _pyplot()
    groups = _groups(list(result.scores))
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_axis_off()
    for ax, (view, keys) in zip(axes.flat, groups.items(), strict=False):
        floor = 1.0 / max(len(result.scores[keys[0]][1]), 1)
        for k in keys:
            r = roc(*result.scores[k])
            ax.plot(np.maximum(r.fpr, floor / 2), np.maximum(r.tpr, floor / 2), label=k.split("/", 1)[1], lw=1.2)
        ax.plot([floor / 2, 1], [floor / 2, 1], "k:", lw=0.8, label="chance")
        ax.set(xscale="log", yscale="log", xlabel="false-positive rate", ylabel="true-positive rate", title=view)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"ROC (log-log), defense {result.report.defense}")
    _save(fig, path)


def plot_distributions(result: AuditResult, path: Path) -> None:
    plt = _pyplot()
    rows = [("undefended", result.clean)]
    if result.report.defended:
        rows.append(("released", result.released))
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.4 * len(rows)), squeeze=False)
    for (title, (p_in, p_out)), ax_row in zip(rows, axes, strict=True):
        metrics = (("confidence on the true label", confidence), ("entropy", lambda d: -neg_entropy(d)))
        for ax, (metric, fn) in zip(ax_row, metrics, strict=True):
            a, b = fn(AttackData(p_in, result.labels[0])), fn(AttackData(p_out, result.labels[1]))
            bins = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()) + 1e-9, 40)
            ax.hist(a, bins=bins, alpha=0.55, label="members", density=True)
            ax.hist(b, bins=bins, alpha=0.55, label="non-members", density=True)
            ax.set(title=f"{title}: {metric}", xlabel=metric, ylabel="density")
            ax.legend(fontsize=8)
    _save(fig, path)


def plot_l1(result: AuditResult, path: Path) -> None:
    plt = _pyplot()
    d_in = np.abs(result.released[0] - result.clean[0]).sum(axis=1)
    d_out = np.abs(result.released[1] - result.clean[1]).sum(axis=1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, max(d_in.max(), d_out.max(), 1e-6), 40)
    ax.hist(d_in, bins=bins, alpha=0.55, label=f"members (mean {d_in.mean():.3f})")
    ax.hist(d_out, bins=bins, alpha=0.55, label=f"non-members (mean {d_out.mean():.3f})")
    ax.set(title=f"L1 distortion, defense {result.report.defense}", xlabel="‖released − clean‖₁", ylabel="rows")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_per_class(result: AuditResult, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, accs in result.report.per_class_balanced_accuracy.items():
        if accs:
            v = np.sort(np.fromiter(accs.values(), float))
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=key, lw=1)
    ax.axvline(result.report.utility.label_only_floor, color="k", ls=":", lw=0.8, label="label-only floor")
    ax.set(xlabel="per-class balanced accuracy", ylabel="share of classes (CDF)", title="per-class attack accuracy")
    ax.legend(fontsize=6, ncols=2)
    _save(fig, path)


def _interval(r: AttackResult) -> str:
    """' [low, high]': the TPR@0.1% FPR bootstrap interval, where the report has one."""
    if r.tpr_at_01pct_fpr_low is None or r.tpr_at_01pct_fpr_high is None:
        return ""
    return f" [{r.tpr_at_01pct_fpr_low:.4f}, {r.tpr_at_01pct_fpr_high:.4f}]"


def markdown(report: AuditReport) -> str:
    u, s = report.utility, report.summary
    floor = u.label_only_floor
    params = ", ".join(f"{k}={v}" for k, v in report.defense_params.items())
    lines = [
        f"# Membership-inference audit: {report.bundle.name} {report.bundle.version}",
        "",
        f"Target: {report.target}; defense `{report.defense}`{f' ({params})' if params else ''}.",
        f"Test accuracy {u.test_accuracy:.4f} (undefended {u.undefended_test_accuracy:.4f}, train "
        f"{u.train_accuracy:.4f}); label loss {u.label_loss:.4f}; mean L1 {u.l1.mean:.4f} "
        f"(median {u.l1.median:.4f}, p99 {u.l1.p99:.4f}, max {u.l1.max:.4f}; members "
        f"{u.l1_members.mean:.4f}, non-members {u.l1_nonmembers.mean:.4f}).",
        f"**Label-only floor: {floor:.4f}** = 0.5 + (train − test)/2: an attack that reads only whether the "
        "label is right reaches it, so no label-preserving defense can push the best attack below it.",
    ]
    if u.ece is not None and u.nll is not None and u.top5_accuracy is not None:
        lines.append(
            f"Cost to users (evaluation non-members): top-5 accuracy {u.top5_accuracy:.4f} (undefended "
            f"{u.undefended_top5_accuracy:.4f}); calibration error {u.ece:.4f} ({u.undefended_ece:.4f}); NLL "
            f"{u.nll:.4f} ({u.undefended_nll:.4f})."
        )
    if u.exact_repeats_identical is not None:
        near = "" if u.near_repeats_agree is None else (
            f"; copies jittered by ±jitter answered within 1e-3 in L1 (the same draw): {u.near_repeats_agree:.1%}")
        lines.append(f"Exact repeated queries answered identically: {u.exact_repeats_identical:.1%} of rows{near}.")
    if (mp := report.metrics_probe) is not None:
        lines.append(
            f"Scraper attacker (/metrics on the clients' port around {mp.rows} single-row queries per side): "
            + (f"AUC {mp.auc:.3f}, balanced accuracy {mp.balanced_accuracy:.3f} at its best threshold."
               if mp.reachable else f"/metrics answered {mp.status}: nothing to read.")
        )  # fmt: skip
    if (tp := report.timing_probe) is not None:
        lines.append(
            f"Timing attacker ({tp.rows} members and non-members, each queried alone {tp.repeats} times"
            + (f" as {tp.copies} copies" if tp.copies > 1 else "") + ", "
            f"{'over HTTP' if tp.over_http else 'in process'}; fastest answer, median {tp.member_median_ms:.2f} vs "
            f"{tp.nonmember_median_ms:.2f} ms): AUC {tp.auc:.3f} (labels shuffled: 95% below {tp.noise_auc_95:.3f}, "
            f"p = {tp.p_value:.3f}), balanced accuracy {tp.balanced_accuracy:.3f} at its best threshold."
        )
    if lira := next((r for r in report.attacks.values() if r.reference_replacement is not None), None):
        copied = lira.reference_replacement
        lines.append(f"LiRA's {lira.reference_models} reference models were trained as `{copied}`"
                     + (": plain, the attacker who does not copy a training-time defense." if copied == "none"
                        else ": the attacker copies the training-time defense."))  # fmt: skip
    lines += ["", "Attacker views:"] + [f"- `{v}`: {note}" for v, note in report.views.items()]
    lines += [
        "",
        "| view / attack | balanced acc. (attacker's τ) | oracle | AUC | TPR@1% FPR | TPR@0.1% FPR [95% CI] "
        "| vs floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report.attacks.items():
        own = r.label_only_floor_on_rows or floor  # label-only attacks query a subsample: its own floor
        lines.append(
            f"| {name} | {r.balanced_accuracy:.4f} | {r.oracle_balanced_accuracy:.4f} | {r.auc:.4f} | "
            f"{r.tpr_at_1pct_fpr:.4f} | {r.tpr_at_01pct_fpr:.4f}{_interval(r)} | {r.balanced_accuracy - own:+.4f} |"
        )
    best, conf = s.best_attack, s.best_confidence_based
    lines += [""]
    if best:
        lines.append(f"Best attack: `{best.attack}` at {best.balanced_accuracy:.4f} (floor {floor:.4f}).")
    if conf and report.defended:
        verdict = "within" if s.confidence_based_within_1pt_of_floor else "**not** within"
        lines.append(f"Best confidence-based attack: `{conf.attack}` at {conf.balanced_accuracy:.4f}, {verdict} "
                     f"1 point of the floor; largest TPR@0.1% FPR {s.max_tpr_at_01pct_fpr:.4f}.")  # fmt: skip
    lines += ["", f"Sets: {report.sets.model_dump()}. TPR@0.1% FPR resolves 1/{report.sets.nonmembers}; its "
              "interval is a seeded bootstrap over members and non-members.",
              f"Plots: {', '.join(PLOTS)}. Raw scores: scores.npz. {report.seconds} s.", ""]  # fmt: skip
    return "\n".join(lines)


def write_report(result: AuditResult, out: Path, *, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write(result.report, out / "report.json")
    (out / "report.md").write_text(markdown(result.report))
    arrays = {
        f"{k}/{side}": v
        for k, pair in result.scores.items()
        for side, v in zip(("members", "nonmembers"), pair, strict=True)
    }
    np.savez_compressed(out / "scores.npz", **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds
    if plots:
        plot_roc(result, out / "roc.png")
        plot_distributions(result, out / "distributions.png")
        plot_l1(result, out / "l1.png")
        plot_per_class(result, out / "per_class_cdf.png")
