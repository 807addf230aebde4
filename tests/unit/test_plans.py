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
