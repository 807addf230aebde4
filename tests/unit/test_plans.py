"""The sweep plans under bench/plans/ stay runnable: `make results` reads them hours after a rename."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest

from defense_models.__main__ import build_parser
from defense_models.audit.sweep import load_plan
from gateway.defenses import available_defenses

PLANS = sorted((Path(__file__).resolve().parents[2] / "bench" / "plans").glob("*.toml"))


@pytest.mark.parametrize("plan", PLANS, ids=[p.stem for p in PLANS])
def test_plan_parses_and_prepares_every_bundle_it_uses(plan: Path) -> None:
    bundle, _, settings = load_plan(plan)  # unknown [audit] or setting keys raise
    parser = build_parser()
    prepared = set()
    for command in tomllib.loads(plan.read_text()).get("prepare", []):
        args = parser.parse_args(shlex.split(command))  # unknown flags or choices exit
        prepared.add(Path(args.out))
    used = {bundle} | {s.bundle for s in settings if s.bundle is not None}
    audits = [tomllib.loads(plan.read_text()).get("audit", {})] + [s.audit for s in settings]
    used |= {Path(a["lira_shadows"]) for a in audits if a.get("lira_shadows")}  # LiRA's references too
    assert used <= prepared, f"{plan.name}: no `prepare` command builds {sorted(map(str, used - prepared))}"
    assert {s.defense for s in settings} <= set(available_defenses())
    from defense_models.audit.config import VIEWS

    assert set(tomllib.loads(plan.read_text()).get("audit", {}).get("views", [])) <= set(VIEWS)


def test_sweep_parts_side_by_side_write_the_table_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two parts run at once: the one that finishes last reads back what the other wrote meanwhile."""
    from types import SimpleNamespace

    from defense_models.audit import sweep

    settings = [sweep.Setting("a", "none", {}), sweep.Setting("b", "none", {})]
    tables: list[list[str]] = []

    def row(label: str) -> SimpleNamespace:
        return SimpleNamespace(label=label, best_attack="x", best_balanced_accuracy=0.5, label_only_floor=0.5)

    def audit(setting: sweep.Setting, *_: object) -> SimpleNamespace:
        (tmp_path / setting.slug).mkdir()
        (tmp_path / setting.slug / "report.json").write_text("{}")
        if setting.label == "b":  # meanwhile, the other part finishes "a"
            audit(settings[0])
        return row(setting.label)

    monkeypatch.setattr(sweep, "_audit_setting", audit)
    monkeypatch.setattr(sweep, "read", lambda _, path: Path(path).parent.name)
    monkeypatch.setattr(sweep, "_row", lambda setting, report: row(report))
    monkeypatch.setattr(sweep, "write", lambda table, path: tables.append([r.label for r in table.rows]))
    monkeypatch.setattr(sweep, "Sweep", SimpleNamespace)
    monkeypatch.setattr(sweep, "sweep_markdown", lambda rows: "")
    monkeypatch.setattr(sweep, "plot_sweep", lambda rows, path: None)
    (tmp_path / "manifest.json").write_text("{}")  # the bundle the inputs check looks for
    rows = sweep.run_sweep(tmp_path, settings, tmp_path, only=frozenset({"b"}))
    assert rows is not None and [r.label for r in rows] == ["a", "b"]
    assert tables == [["a", "b"]]  # the table, in the plan's order, written once
