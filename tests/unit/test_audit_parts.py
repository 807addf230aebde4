"""The audit's small parts: the rounding attacker's pre-processing and the goal summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from defense_models.audit.run import summarize
from defense_models.audit.schema import AttackResult
from defense_models.audit.views import round_vectors


@given(arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(2, 30)), elements=st.floats(0, 1)),
       st.integers(0, 4))  # fmt: skip
def test_round_vectors_stays_on_the_simplex(raw: np.ndarray, decimals: int) -> None:
    p = np.where(raw.sum(1, keepdims=True) > 0, raw, 1.0)
    p = p / p.sum(1, keepdims=True)
    r = round_vectors(p, decimals)
    assert np.isfinite(r).all() and (r >= 0).all()
    np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-9)


def test_round_vectors_removes_small_noise() -> None:
    p = np.array([[0.6, 0.3, 0.1]])
    noisy = p + np.array([[0.001, -0.0004, -0.0006]])
    np.testing.assert_allclose(round_vectors(noisy, 2), p)


def _scores(bacc: float, tpr: float = 0.0) -> AttackResult:
    return AttackResult(balanced_accuracy=bacc, oracle_balanced_accuracy=bacc, precision=0.5, recall=0.5, auc=bacc,
                        tpr_at_1pct_fpr=tpr, tpr_at_01pct_fpr=tpr, advantage=0.0, threshold=0.0, n_members=10,
                        n_nonmembers=10)  # fmt: skip


def test_summary_picks_the_best_and_judges_the_floor() -> None:
    results = {
        "shadow/gap": _scores(0.70),
        "adaptive/nn_sorted": _scores(0.705, tpr=0.004),
        "label-only/boundary_distance": _scores(0.72),
        "reference/lira_online": _scores(0.69, tpr=0.02),
    }
    s = summarize(results, floor=0.70)
    assert s.best_attack is not None and s.best_attack.attack == "label-only/boundary_distance"
    # gap and label-only read no confidences
    assert s.best_confidence_based is not None and s.best_confidence_based.attack == "adaptive/nn_sorted"
    assert s.confidence_based_within_1pt_of_floor and s.max_tpr_at_01pct_fpr == 0.02
    results["shadow/confidence"] = _scores(0.75)
    assert not summarize(results, floor=0.70).confidence_based_within_1pt_of_floor


def test_report_files_round_trip_and_refuse_other_schemas(tmp_path: Path) -> None:
    from defense_models.audit.schema import Sweep, SweepRow, read, write

    row = SweepRow(setting="none", slug="none", curve=None, x=None, defense="none", params={},
                   attacker_data={"source": "real"}, replacement=None, test_accuracy=0.6,
                   undefended_test_accuracy=0.6, train_accuracy=1.0, label_loss=0.0, mean_l1=0.0,
                   label_only_floor=0.7, best_attack="shadow/gap", best_balanced_accuracy=0.7,
                   best_confidence_based=None, best_confidence_based_accuracy=None, best_confidence_based_auc=None,
                   max_tpr_at_1pct_fpr=0.0, max_tpr_at_01pct_fpr=0.0,
                   attacks={"shadow/gap": {"auc": 0.7, "threshold": float("inf")}})  # fmt: skip
    write(Sweep(rows=[row]), tmp_path / "sweep.json")
    assert read(Sweep, tmp_path / "sweep.json").rows == [row]  # ±inf survive the round trip
    (tmp_path / "old.json").write_text(json.dumps([row.model_dump(mode="json")]))  # the unversioned list
    with pytest.raises(ValueError, match="re-run the audit or sweep"):
        read(Sweep, tmp_path / "old.json")


def test_eval_rows_samples_members_and_nonmembers_alike_and_leaves_the_rest() -> None:
    """``eval_rows``: a seeded sample of the evaluation members and non-members (sorted, without repeats), the
    same for the same seed; the attacker's roles are untouched, and None or a larger N keeps everything."""
    from defense_models.audit.config import AuditConfig
    from defense_models.audit.run import _sampled
    from defense_models.audit.views import Sets

    rng = np.random.default_rng(0)
    rows = rng.permutation(1_000)
    parts = {"target_train": rows[:300], "eval_nonmember": rows[300:600], "shadow_in": rows[600:800],
             "shadow_out": rows[800:]}  # fmt: skip
    sets = Sets(data=None, parts=parts)
    config = AuditConfig(bundle=Path("b"), eval_rows=50)
    a, b = _sampled(sets, config), _sampled(sets, config)
    for role in ("target_train", "eval_nonmember"):
        s = a.parts[role]
        assert len(s) == 50 == len(set(s)) and np.all(np.diff(s) > 0) and set(s) <= set(parts[role])
        np.testing.assert_array_equal(s, b.parts[role])
    assert not np.array_equal(a.parts["target_train"], _sampled(sets, AuditConfig(Path("b"), eval_rows=50,
                                                                                   seed=1)).parts["target_train"])
    for role in ("shadow_in", "shadow_out"):
        assert a.parts[role] is parts[role]
    for keep in (None, 300, 10_000):
        assert {k: len(v) for k, v in _sampled(sets, AuditConfig(Path("b"), eval_rows=keep)).parts.items()} == \
            {k: len(v) for k, v in parts.items()}  # fmt: skip
