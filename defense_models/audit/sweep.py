"""Many audits, one table: privacy budget curves and defense comparisons.

A sweep is a list of settings (bundle, defense, parameters), each audited with the same attack
configuration. It writes, under ``out``:

* ``<slug>/``: every setting's full audit report (report.md, report.json, plots);
* ``sweep.json``, ``sweep.md``: one summary row per setting (utility, floor, best attack, best
  confidence-based attack, TPR at low FPR) and matrices of every attack × setting;
* ``sweep.png``: best attack vs. the swept parameter for each curve (with MemGuard's published
  Location curve where it applies), and the privacy-utility scatter of all settings.

Plans come from the command line (``--defense memguard --param epsilon --values 0.1 0.3``) or from a
TOML file (``--plan``, see ``docs/RESULTS.md``): a top-level ``bundle``, an optional ``[audit]`` table
of ``AuditConfig`` fields, and ``[[setting]]`` entries with ``label``, ``defense``, ``params``, and
optionally ``bundle``, ``curve`` and ``x``.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from defense_models.audit.config import AuditConfig
from defense_models.audit.queries import check_references
from defense_models.audit.report import write_report
from defense_models.audit.run import run_audit
from defense_models.audit.schema import AttackResult, AuditReport, Sweep, SweepRow, read, write
from defense_models.training.shadows import shadow_metas

#: MemGuard's published Location curve, NN attack vs ε (docs/ALGORITHMS.md §9; for comparison only).
PUBLISHED_MEMGUARD_LOCATION = {0.1: 0.69, 0.3: 0.62, 0.5: 0.55, 0.7: 0.52, 1.0: 0.50}


@dataclass(frozen=True)
class Setting:
    label: str
    defense: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    bundle: Path | None = None  # default: the sweep's bundle
    curve: str | None = None  # settings sharing a curve are plotted against x
    x: float | None = None
    audit: dict[str, Any] = field(default_factory=dict)  # AuditConfig fields for this setting only

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.=+-]+", "_", self.label).strip("_") or "setting"


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def grid(defense: str, param: str, values: list[str]) -> list[Setting]:
    """--defense D --param P --values v1 v2 …: one setting per value, on one curve."""
    out = []
    for text in values:
        v = parse_value(text)
        out.append(Setting(f"{defense} {param}={v}", defense, {param: v}, curve=f"{defense} {param}",
                           x=float(v) if isinstance(v, int | float) else None))  # fmt: skip
    return out


def load_plan(path: Path) -> tuple[Path, dict[str, Any], list[Setting]]:
    """(bundle, audit overrides, settings) from a TOML plan; relative paths are relative to the cwd."""
    plan = tomllib.loads(Path(path).read_text())
    audit = plan.get("audit", {})
    known = {f.name for f in fields(AuditConfig)} - {"bundle", "defense", "defense_params"}
    if bad := set(audit) - known:
        raise ValueError(f"{path}: unknown [audit] keys {sorted(bad)}; known: {sorted(known)}")
    settings = []
    for s in plan.get("setting", []):
        if bad := set(s) - {"label", "defense", "params", "bundle", "curve", "x", "audit"}:
            raise ValueError(f"{path}: unknown setting keys {sorted(bad)}")
        if bad := set(s.get("audit", {})) - known:
            raise ValueError(f"{path}: setting {s['label']!r}: unknown audit keys {sorted(bad)}")
        settings.append(Setting(s["label"], s.get("defense", "none"), dict(s.get("params", {})),
                                Path(s["bundle"]) if "bundle" in s else None, s.get("curve"), s.get("x"),
                                dict(s.get("audit", {}))))  # fmt: skip
    if "bundle" not in plan or not settings:
        raise ValueError(f"{path}: a plan needs `bundle = ...` and at least one [[setting]]")
    return Path(plan["bundle"]), audit, settings


def audit_config(base: AuditConfig, overrides: dict[str, Any]) -> AuditConfig:
    """``base`` with TOML values applied (lists become tuples, paths become Paths)."""
    for key, value in overrides.items():
        if isinstance(value, list):
            value = tuple(value)
        if key in ("lira_shadows", "bundle"):
            value = Path(value) if value else None  # "" switches LiRA off for one setting
        base = replace(base, **{key: value})
    return base


def _row(setting: Setting, report: AuditReport) -> SweepRow:
    u, s = report.utility, report.summary
    conf = s.best_confidence_based
    assert s.best_attack is not None, "an audit runs at least one attack"
    return SweepRow(
        setting=setting.label, slug=setting.slug, curve=setting.curve, x=setting.x, defense=setting.defense,
        params=setting.params, attacker_data=report.attacker_data, replacement=report.bundle.replacement,
        test_accuracy=u.test_accuracy, undefended_test_accuracy=u.undefended_test_accuracy,
        train_accuracy=u.train_accuracy, label_loss=u.label_loss, mean_l1=u.l1.mean,
        label_only_floor=u.label_only_floor,
        best_attack=s.best_attack.attack, best_balanced_accuracy=s.best_attack.balanced_accuracy,
        best_confidence_based=conf.attack if conf else None,
        best_confidence_based_accuracy=conf.balanced_accuracy if conf else None,
        best_confidence_based_auc=conf.auc if conf else None,
        max_tpr_at_1pct_fpr=max(r.tpr_at_1pct_fpr for r in report.attacks.values()),
        max_tpr_at_01pct_fpr=s.max_tpr_at_01pct_fpr,
        attacks={k: _attack_metrics(r) for k, r in report.attacks.items()},
        utility=u,
    )  # fmt: skip


#: what a sweep row keeps of each attack (the interval's bounds only where the report has them)
SWEEP_METRICS = ("balanced_accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "tpr_at_01pct_fpr_low",
                 "tpr_at_01pct_fpr_high")  # fmt: skip


def _attack_metrics(r: AttackResult) -> dict[str, float]:
    return {m: v for m in SWEEP_METRICS if (v := getattr(r, m)) is not None}


def run_sweep(bundle: Path, settings: list[Setting], out: Path, base: AuditConfig | None = None, *,
              resume: bool = False, shard: tuple[int, int] = (0, 1),
              only: frozenset[str] | None = None) -> list[SweepRow] | None:  # fmt: skip
    """Audit every setting; with ``resume``, a setting whose report.json is already in ``out`` is read
    back instead of audited again (an interrupted sweep picks up where it stopped).

    ``shard`` (i, N) and ``only`` (labels) audit part of the plan, so parts run side by side (processes,
    machines) into one ``out``; the other settings' reports are read back where they exist. The table
    (sweep.json, .md, .png) is written once every setting has a report; otherwise None is returned."""
    base = base or AuditConfig(bundle=bundle)
    out.mkdir(parents=True, exist_ok=True)
    partial = shard != (0, 1) or only is not None
    _check_inputs([s for i, s in enumerate(settings) if i % shard[1] == shard[0] and (only is None or s.label in only)
                   and not (resume and (out / s.slug / "report.json").exists())], bundle, base)  # fmt: skip
    found: dict[int, SweepRow] = {}  # setting index -> its row
    for i, setting in enumerate(settings):
        done = out / setting.slug / "report.json"
        mine = i % shard[1] == shard[0] and (only is None or setting.label in only)
        if (resume or not mine) and done.exists():
            found[i] = _row(setting, read(AuditReport, done))
            print(f"[{i + 1}/{len(settings)}] {setting.label}: already audited, read back", flush=True)
        elif mine:
            t0 = time.perf_counter()
            found[i] = row = _audit_setting(setting, bundle, base, out)
            print(f"[{i + 1}/{len(settings)}] {setting.label}: best {row.best_attack} "
                  f"{row.best_balanced_accuracy:.3f}, floor {row.label_only_floor:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            if not partial:
                write(Sweep(rows=list(found.values())), out / "sweep.json")  # after every setting: progress
    for i, setting in enumerate(settings):  # parts that ran side by side may have finished meanwhile
        if i not in found and (done := out / setting.slug / "report.json").exists():
            found[i] = _row(setting, read(AuditReport, done))
    if missing := [s.label for i, s in enumerate(settings) if i not in found]:
        print(f"{len(missing)} settings have no report yet ({missing}): the table is written once they do "
              "(the other parts, or a run without --shard/--setting)", flush=True)  # fmt: skip
        return None
    rows = [found[i] for i in range(len(settings))]
    write(Sweep(rows=rows), out / "sweep.json")
    (out / "sweep.md").write_text(sweep_markdown(rows))
    plot_sweep(rows, out / "sweep.png")
    return rows


def _check_inputs(settings: list[Setting], bundle: Path, base: AuditConfig) -> None:
    """Before the first audit: every bundle and LiRA reference set the settings to audit need is there and
    complete, so a missing shard fails in seconds, not after the hours the settings before it take."""
    for setting in settings:
        config = audit_config(replace(base, bundle=setting.bundle or bundle), setting.audit)
        if not (config.bundle / "manifest.json").exists():
            raise FileNotFoundError(f"setting {setting.label!r}: no bundle at {config.bundle} (run `train` first)")
        if config.lira_shadows is not None:
            check_references([meta for _, meta in shadow_metas(config.lira_shadows)], config.lira_shadows)


def _audit_setting(setting: Setting, bundle: Path, base: AuditConfig, out: Path) -> SweepRow:
    config = audit_config(replace(base, bundle=setting.bundle or bundle, defense=setting.defense,
                                  defense_params=setting.params), setting.audit)  # fmt: skip
    result = run_audit(config)
    write_report(result, out / setting.slug)
    return _row(setting, result.report)


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def sweep_markdown(rows: list[SweepRow]) -> str:
    lines = [
        "| setting | test acc. | label loss | mean L1 | floor | best attack (bal. acc.) | best confidence-based "
        "(bal. acc. / AUC) | max TPR@1% FPR | max TPR@0.1% FPR |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| [{r.setting}]({r.slug}/report.md) | {r.test_accuracy:.3f} | {r.label_loss:.3f} | "
            f"{r.mean_l1:.3f} | {r.label_only_floor:.3f} | `{r.best_attack}` {r.best_balanced_accuracy:.3f} "
            f"| `{r.best_confidence_based}` {_f(r.best_confidence_based_accuracy)} / "
            f"{_f(r.best_confidence_based_auc)} | {r.max_tpr_at_1pct_fpr:.3f} | {r.max_tpr_at_01pct_fpr:.3f} |"
        )
    attacks = list(dict.fromkeys(k for r in rows for k in r.attacks))
    for metric, title in (("balanced_accuracy", "Balanced accuracy (attacker's threshold)"), ("auc", "AUC"),
                          ("tpr_at_01pct_fpr", "TPR at 0.1% FPR")):  # fmt: skip
        lines += ["", f"**{title}**, every attack × setting:", "",
                  "| view / attack | " + " | ".join(r.setting for r in rows) + " |",
                  "|---|" + "---:|" * len(rows)]  # fmt: skip
        for a in attacks:
            lines.append(f"| {a} | " + " | ".join(_f(r.attacks.get(a, {}).get(metric)) for r in rows) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[SweepRow], path: Path) -> None:
    from defense_models.audit.report import _pyplot, _save

    plt = _pyplot()
    curves: dict[str, list[SweepRow]] = {}
    for r in rows:
        if r.curve and r.x is not None:
            curves.setdefault(r.curve, []).append(r)
    panels = len(curves) + 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2), squeeze=False)
    for ax, (curve, pts) in zip(axes[0], curves.items(), strict=False):
        pts = sorted(pts, key=lambda r: r.x or 0.0)
        x = [r.x for r in pts]
        ax.plot(x, [r.best_balanced_accuracy for r in pts], "o-", label="best attack")
        ax.plot(x, [r.best_confidence_based_accuracy for r in pts], "s--", label="best confidence-based")
        for key, style in (("shadow/nn_sorted", "^-"), ("adaptive/nn_sorted", "v-")):
            if all(key in r.attacks for r in pts):
                nn = [r.attacks[key]["balanced_accuracy"] for r in pts]
                ax.plot(x, nn, style, label=f"NN attack ({key.split('/')[0]})")
        ax.plot(x, [r.label_only_floor for r in pts], "k:", label="label-only floor")
        if curve.startswith("memguard"):
            px = sorted(PUBLISHED_MEMGUARD_LOCATION)
            ax.plot(
                px, [PUBLISHED_MEMGUARD_LOCATION[v] for v in px], "x:", color="gray", label="published NN (Location)"
            )
        ax.set(xlabel=curve, ylabel="balanced accuracy", title=f"attack accuracy vs {curve}", ylim=(0.45, 1.0))
        ax.legend(fontsize=7)
    _privacy_utility(axes[0][-2], rows, lambda r: r.best_balanced_accuracy, "best attack balanced accuracy")
    _privacy_utility(axes[0][-1], rows, lambda r: r.max_tpr_at_01pct_fpr, "largest TPR at 0.1% FPR")
    _save(fig, path)


def plot_privacy_utility(rows: list[SweepRow], path: Path, goals: Goals | None = None) -> None:
    """Test accuracy against the best attack and against the largest TPR at 0.1% FPR (log scale), one colour
    and legend entry per setting name: rows that share a name (e.g. trainings of one recipe, picked from a
    sweep and renamed) are one series. The goals, when given, as dashed lines."""
    from defense_models.audit.report import _pyplot, _save

    plt = _pyplot()
    series: dict[str, list[SweepRow]] = {}
    for r in rows:
        series.setdefault(r.setting, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), squeeze=False)
    panels = ((lambda r: r.best_balanced_accuracy, "best attack balanced accuracy", "linear",
               goals and goals.max_best_attack),
              (lambda r: max(r.max_tpr_at_01pct_fpr, TPR_FLOOR), "largest TPR at 0.1% FPR", "log",
               goals and goals.max_tpr_at_01pct_fpr))  # fmt: skip
    for ax, (y, ylabel, scale, limit) in zip(axes[0], panels, strict=True):
        for name, pts in series.items():
            ax.scatter([r.test_accuracy for r in pts], [y(r) for r in pts], s=22, label=name)
        if goals is not None:
            ax.axvline(goals.min_test_accuracy, color="gray", linestyle="--", linewidth=0.8)
            ax.axhline(limit, color="gray", linestyle="--", linewidth=0.8)
        ax.set(xlabel="test accuracy", ylabel=ylabel, yscale=scale, title=f"privacy vs utility: {ylabel}")
    axes[0][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)


#: the log-scale TPR panel draws a TPR of 0 here (0.1%: no attack measured above its own FPR)
TPR_FLOOR = 1e-3


class Goals(NamedTuple):
    """Where a privacy-utility plot draws its goal lines: test accuracy at least, best attack and TPR at most."""

    min_test_accuracy: float
    max_best_attack: float
    max_tpr_at_01pct_fpr: float


def _privacy_utility(ax: Any, rows: list[SweepRow], y: Callable[[SweepRow], float], ylabel: str) -> None:
    """One point per setting: test accuracy (x) against the worst leak (y), labelled."""
    for r in rows:
        ax.scatter(r.test_accuracy, y(r), s=18)
        ax.annotate(r.setting, (r.test_accuracy, y(r)), fontsize=6)
    ax.set(xlabel="test accuracy", ylabel=ylabel, title=f"privacy vs utility: {ylabel}")
