"""bench/summarize.py's privacy-vs-utility plot of picked settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import summarize
from defense_models.audit.schema import SweepRow
from defense_models.audit.sweep import Goals, plot_privacy_utility


def _row(setting: str, test: float, best: float, tpr: float) -> SweepRow:
    return SweepRow.model_construct(setting=setting, test_accuracy=test, best_balanced_accuracy=best,
                                    max_tpr_at_01pct_fpr=tpr)  # fmt: skip


def test_a_pick_splits_at_the_equals_sign_before_a_setting_of_the_sweep() -> None:
    settings = {"plain": 1, "SELENA + MemGuard eps=1": 2}
    assert summarize._split_pick("plain=plain", settings) == ("plain", "plain")
    assert summarize._split_pick("ε=1 on top=SELENA + MemGuard eps=1", settings) == ("ε=1 on top",
                                                                                     "SELENA + MemGuard eps=1")
    assert summarize._split_pick("x=SELENA", settings) is None


def test_picks_are_renamed_grouped_by_name_and_judged_against_the_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [_row("plain", 0.62, 0.89, 0.2), _row("recipe, seed 0", 0.67, 0.53, 0.008),
            _row("recipe, seed 20", 0.66, 0.54, 0.0)]  # fmt: skip
    drawn: list[Any] = []
    monkeypatch.setattr("defense_models.audit.sweep.plot_privacy_utility",
                        lambda picked, out, goals: drawn.append((picked, out, goals)))  # fmt: skip
    out = tmp_path / "frontier.png"
    summarize.plot(rows, ["plain=plain", "recipe=recipe, seed 0", "recipe=recipe, seed 20"], out, "plain")
    ((picked, path, goals),) = drawn
    assert [r.setting for r in picked] == ["plain", "recipe", "recipe"] and path == out
    assert [r.test_accuracy for r in picked] == [0.62, 0.67, 0.66]
    assert goals == pytest.approx(Goals(0.59, 0.60, 0.01))
    assert rows[1].setting == "recipe, seed 0"  # the sweep's rows are not renamed
    with pytest.raises(SystemExit, match="not found"):
        summarize.plot(rows, ["recipe=recipe, seed 1"], out, None)


def test_the_plot_draws_a_tpr_of_zero_on_its_log_scale(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "frontier.png"
    plot_privacy_utility([_row("a", 0.6, 0.7, 0.0), _row("a", 0.61, 0.6, 0.02), _row("b", 0.5, 0.5, 0.3)], out,
                         Goals(0.59, 0.60, 0.01))  # fmt: skip
    assert out.stat().st_size > 10_000
