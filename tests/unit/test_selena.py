"""SELENA's exclusion map, sharded sub-models and soft labels (defense_models/training/selena.py)."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defense_models.training.data import Dataset
from defense_models.training.loop import FitConfig
from defense_models.training.selena import (
    TEMPERATURES,
    SplitAI,
    Splits,
    capped,
    crossover_rows,
    exclusion_map,
    fold_rows,
    held_out_relabel,
    log_odds,
    map_digest,
    matched_temperature,
    own_teachers,
    tempered,
    trains_on,
)


def test_each_record_is_left_out_of_exactly_l_distinct_submodels() -> None:
    ex = exclusion_map(500, K=25, L=10, seed=3)
    assert ex.shape == (500, 10) and all(len(set(row)) == 10 for row in ex.tolist())
    assert map_digest(ex) == "3319dfc05698f26e"  # the cached sub-models' key: stream 0 must keep drawing this map
    assert ex.min() >= 0 and ex.max() < 25
    assert (exclusion_map(500, 25, 10, seed=3) == ex).all()  # seeded
    assert map_digest(ex) != map_digest(exclusion_map(500, 25, 10, seed=4))
    share = np.mean([trains_on(ex, k).mean() for k in range(25)])
    assert share == pytest.approx(15 / 25, abs=0.02)  # each sub-model sees (K − L)/K of the records
    with pytest.raises(ValueError, match="0 < L < K"):
        exclusion_map(10, K=5, L=5, seed=0)


def _data(n: int = 120) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0).astype(np.int64)
    return Dataset(name="toy", X=X, y=y, classes=4, sha256="toy"), torch.from_numpy(X), torch.from_numpy(y)


def _replacement_context() -> tuple[Any, torch.Tensor]:
    """A replacement Context on the toy data: members 80 rows, reference 20, validation 20; and X [120, 6]."""
    from defense_models.training.adv_reg import AdvRegConfig
    from defense_models.training.replacements import Context

    data, X, y = _data()
    ctx = Context(data, "small-mlp", FitConfig(epochs=2, batch_size=32, lr=1e-2), (X[:80], y[:80]),
                  (X[80:100], y[80:100]), (X[100:], y[100:]), 0, False, AdvRegConfig(), True)  # fmt: skip
    return ctx, X


def test_soft_labels_come_only_from_submodels_that_never_saw_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, X, y = _data()
    ex = exclusion_map(len(y), K=5, L=2, seed=0)
    config = FitConfig(epochs=2, batch_size=32, lr=1e-2)
    split_ai = SplitAI("small-mlp", data, config, ex, 5, tmp_path)
    seen: dict[int, np.ndarray] = {}
    train = SplitAI.train

    def recording(self: SplitAI, k: int, X_: torch.Tensor, y_: torch.Tensor, progress: bool) -> torch.nn.Module:
        seen[k] = trains_on(self.excluded, k)
        return train(self, k, X_, y_, progress)

    monkeypatch.setattr(SplitAI, "train", recording)
    soft, none = split_ai.soft_labels(X, y, progress=False)
    assert none is None
    assert soft.shape == (len(y), 4) and torch.allclose(soft.sum(1), torch.ones(len(y)), atol=1e-5)
    for i in range(len(y)):
        assert not any(seen[k][i] for k in ex[i])  # its teachers never trained on it
    assert all(split_ai.cached(k) for k in range(5))  # cached for the next run (or the other shards)
    again, _ = SplitAI("small-mlp", data, config, ex, 5, tmp_path).soft_labels(X, y, progress=False)
    assert torch.allclose(again, soft)  # loaded, not retrained
    other_map = SplitAI("small-mlp", data, config, exclusion_map(len(y), 5, 2, seed=1), 5, tmp_path)
    assert not other_map.cached(0)  # a cache for another map is not reused
    longer = SplitAI("small-mlp", data, FitConfig(epochs=3, batch_size=32, lr=1e-2), ex, 5, tmp_path)
    assert not longer.cached(0)  # nor one trained for other epochs


def test_records_no_submodel_saw_are_labelled_by_all_k(tmp_path: Path) -> None:
    data, X, y = _data()
    members, others = slice(0, 80), slice(80, None)
    ex = exclusion_map(80, K=5, L=2, seed=0)
    split_ai = SplitAI("small-mlp", data, FitConfig(epochs=2, batch_size=32, lr=1e-2), ex, 5, tmp_path)
    soft, rest = split_ai.soft_labels(X[members], y[members], progress=False, others=X[others])
    assert rest is not None and rest.shape == (40, 4)
    from defense_models.training.nets import predict_logits

    models = [split_ai.train(k, X[members], y[members], progress=False) for k in range(5)]  # from the cache
    expected = torch.stack([torch.softmax(predict_logits(m, X[others]).double(), 1) for m in models]).mean(0)
    assert torch.allclose(rest.double(), expected, atol=1e-6)  # the mean of every sub-model, none of which saw them
    alone, _ = split_ai.soft_labels(X[members], y[members], progress=False)
    assert torch.allclose(alone, soft)  # the members' labels do not depend on the others
    teachers = exclusion_map(40, K=5, L=2, seed=0, stream=1)  # [40, 2]: another map from the same seed
    assert (teachers != exclusion_map(40, K=5, L=2, seed=0)).any()
    same, few = split_ai.soft_labels(X[members], y[members], progress=False, others=X[others], others_teachers=teachers)
    probs = torch.stack([torch.softmax(predict_logits(m, X[others]).double(), 1) for m in models])  # [5, 40, 4]
    expected = torch.stack([probs[list(row), i].mean(0) for i, row in enumerate(teachers)])  # [40, 4]
    assert few is not None and torch.allclose(few.double(), expected, atol=1e-6)  # each row: its own L teachers
    assert torch.allclose(same, soft)


def test_distill_weight_decay_reaches_the_distillation_and_the_record(tmp_path: Path) -> None:
    from defense_models.training.replacements import train_replacement

    ctx, _ = _replacement_context()
    params = {"K": "5", "L": "2", "cache": str(tmp_path), "distill_epochs": "30", "distill_lr": "1e-2"}

    def weight_norm(model: torch.nn.Module) -> float:
        return sum(float(p.detach().pow(2).sum()) for n, p in model.named_parameters() if n.endswith("weight"))

    plain, record = train_replacement("selena", ctx, params)
    decayed, decayed_record = train_replacement("selena", ctx, {**params, "distill_weight_decay": "0.5"})
    assert record["distill_weight_decay"] == 0.0 and float(decayed_record["distill_weight_decay"]) == 0.5
    assert weight_norm(decayed) < 0.5 * weight_norm(plain)  # same sub-models (cached), same init: only the decay


def _random_labels(seed: int) -> torch.Tensor:
    """[8, 5] float64 soft labels, some confident, some flat."""
    rng = np.random.default_rng(seed)
    return torch.softmax(torch.from_numpy(rng.normal(scale=3.0, size=(8, 5))), dim=1)


def _rows_sum_to_one(p: torch.Tensor) -> bool:
    return torch.allclose(p.sum(dim=1), torch.ones(len(p), dtype=p.dtype), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1.01, 10.0))
def test_a_temperature_flattens_every_soft_label_and_keeps_its_order(seed: int, temperature: float) -> None:
    soft = _random_labels(seed)
    flat = tempered(soft, temperature)
    assert _rows_sum_to_one(flat)
    assert (flat.argmax(dim=1) == soft.argmax(dim=1)).all()
    above = soft[:, :, None] > soft[:, None, :]  # [8, 5, 5]: class i above class j in the label
    assert (flat[:, :, None] >= flat[:, None, :])[above].all()  # never reversed (ties from rounding allowed)
    assert (flat.max(dim=1).values <= soft.max(dim=1).values + 1e-12).all()  # never more confident
    entropy = lambda p: -(p * p.clamp_min(1e-300).log()).sum(dim=1)  # noqa: E731
    assert (entropy(flat) >= entropy(soft) - 1e-9).all()
    assert tempered(soft, 1.0) is soft
    with pytest.raises(ValueError, match="> 0"):
        tempered(soft, 0.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-3.0, 3.0))
def test_matched_temperature_moves_the_mean_log_odds_towards_the_target(seed: int, shift: float) -> None:
    soft = _random_labels(seed).double()  # [8, 5]
    labels = soft.argmax(dim=1)  # every label the argmax: a flatter label is less confident in it
    p = soft.gather(1, labels[:, None])[:, 0]
    assert torch.allclose(log_odds(soft, labels), torch.log(p / (1 - p)))
    own = float(log_odds(soft, labels).mean())
    assert matched_temperature(soft, labels, own) == pytest.approx(1.0)  # already matched: unchanged
    t = matched_temperature(soft, labels, own + shift)
    assert (t <= 1 + 1e-9) if shift > 0 else (t >= 1 - 1e-9)  # sharper to rise, flatter to fall
    gap = abs(float(log_odds(tempered(soft, t), labels).mean()) - own - shift)
    assert all(gap <= abs(float(log_odds(tempered(soft, float(u)), labels).mean()) - own - shift) + 1e-12
               for u in TEMPERATURES[::10])  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("distill_temperature", "3"), ("label_cap", "0.5")])
def test_flatter_labels_reach_the_distillation_and_the_record(tmp_path: Path, key: str, value: str) -> None:
    from defense_models.training.replacements import train_replacement

    ctx, X = _replacement_context()
    params = {"K": "5", "L": "2", "cache": str(tmp_path), "distill_epochs": "60", "distill_lr": "1e-2"}

    def top(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.softmax(model(X[:80]), dim=1).max(dim=1).values.mean())

    plain, record = train_replacement("selena", ctx, params)
    flat, flat_record = train_replacement("selena", ctx, {**params, key: value})
    assert record[key] == 1.0 and float(flat_record[key]) == float(value)
    assert top(flat) < top(plain)  # same sub-models (cached), same init: only the labels' flattening


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_relabel_folds_partition_the_members(records: int, folds: int, seed: int) -> None:
    folds = min(folds, records)
    parts = fold_rows(records, folds, seed)
    rows = torch.cat(parts)
    assert sorted(rows.tolist()) == list(range(records))  # disjoint, and every member in one
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(torch.equal(a, b) for a, b in zip(parts, fold_rows(records, folds, seed), strict=True))  # seeded


def test_fold_counts_out_of_range_are_refused() -> None:
    for folds in (1, 11):
        with pytest.raises(ValueError, match="relabel_folds"):
            fold_rows(10, folds, 0)


def test_each_member_is_relabelled_by_a_student_that_never_saw_it() -> None:
    members, reference = 30, 10
    Xd = torch.arange(members + reference, dtype=torch.float32)[:, None]  # [40, 1]: a row's value is its index
    soft = torch.softmax(torch.randn(members + reference, 3, generator=torch.Generator().manual_seed(0)), 1)
    seen: dict[int, set[int]] = {}

    class Remembers(torch.nn.Module):
        """Logits [N, 3] = log of the fold number's one-hot, so a relabelled row names its student."""

        def __init__(self, fold: int) -> None:
            super().__init__()
            self.fold = fold

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(torch.nn.functional.one_hot(torch.full((len(x),), self.fold), 3).float() + 1e-9)

    def student(rows: torch.Tensor, labels: torch.Tensor, fold: int) -> torch.nn.Module:
        seen[fold] = {int(v) for v in rows[:, 0]}
        assert torch.equal(labels, soft[rows[:, 0].long()])  # trained on the rows' own labels
        return Remembers(fold)

    out = held_out_relabel(Xd, soft, members, 3, seed=1, student=student)
    assert out.shape == soft.shape and torch.equal(out[members:], soft[members:])  # the reference keeps its labels
    for i in range(members):
        fold = int(out[i].argmax())
        assert i not in seen[fold]  # its student never trained on it
        assert all(i in seen[other] for other in range(3) if other != fold)  # and every other student did
    assert all(set(range(members, members + reference)) <= rows for rows in seen.values())


def test_relabel_folds_reaches_the_distillation_and_the_record(tmp_path: Path) -> None:
    from defense_models.training.replacements import train_replacement

    ctx, _ = _replacement_context()
    params = {"K": "5", "L": "2", "cache": str(tmp_path), "distill_epochs": "5"}
    plain, record = train_replacement("selena", ctx, params)
    again, _ = train_replacement("selena", ctx, params)
    relabelled, relabelled_record = train_replacement("selena", ctx, {**params, "relabel_folds": "2"})
    assert record["relabel_folds"] == 0 and int(relabelled_record["relabel_folds"]) == 2
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.allclose(weights(plain), weights(again))  # same sub-models (cached), same init
    assert not torch.allclose(weights(plain), weights(relabelled))  # so only the labels moved it
    with pytest.raises(ValueError, match="relabel_folds"):  # no members to relabel there
        train_replacement("selena", ctx, {**params, "relabel_folds": "2", "distill_on": "reference"})


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.5, 1.0))
def test_a_cap_lowers_only_the_labels_above_it_and_keeps_their_argmax(seed: int, cap: float) -> None:
    soft = _random_labels(seed)
    out = capped(soft, cap)
    assert _rows_sum_to_one(out)
    assert (out >= 0).all() and (out.max(dim=1).values <= cap + 1e-12).all()
    top = soft.max(dim=1).values
    assert torch.equal(out[top <= cap], soft[top <= cap])  # rows under the cap are left alone
    kept = out.gather(1, soft.argmax(dim=1, keepdim=True))[:, 0]  # [8]: the old argmax's new probability
    assert (kept >= out.max(dim=1).values - 1e-12).all()  # still a largest entry (a tie only at cap 0.5)
    over = top > cap
    ratio = out[over] / soft[over]  # [n, 5]: the rest keep their ratios to each other
    others = torch.ones_like(ratio, dtype=torch.bool).scatter(1, soft[over].argmax(1, keepdim=True), False)
    assert torch.allclose(ratio[others].view(-1, 4), ratio[others].view(-1, 4)[:, :1].expand(-1, 4), rtol=1e-9)
    assert torch.equal(capped(soft, 1.0), soft)
    with pytest.raises(ValueError, match="label_cap"):
        capped(soft, 0.4)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 60))
def test_crossovers_mix_two_rows_of_one_class(seed: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    y = torch.from_numpy(rng.integers(0, 3, size=20))  # [20]
    X = (10 * y[:, None] + torch.from_numpy(rng.integers(0, 2, size=(20, 7)))).float()  # [20, 7]: 10c or 10c + 1
    new = crossover_rows(X, y, count, seed)
    assert new.shape == (count, 7) and torch.equal(new, crossover_rows(X, y, count, seed))  # seeded
    classes = torch.div(new, 10, rounding_mode="floor")  # [count, 7]
    assert (classes == classes[:, :1]).all()  # every feature from rows of one class
    assert ((new - 10 * classes) <= 1).all()


def test_distill_synthetic_adds_rows_only_beside_the_reference(tmp_path: Path) -> None:
    from defense_models.training.replacements import train_replacement

    ctx, _ = _replacement_context()
    params = {"K": "5", "L": "2", "cache": str(tmp_path), "distill_epochs": "2", "distill_on": "both"}
    _, record = train_replacement("selena", ctx, {**params, "distill_synthetic": "30"})
    assert record["distill_rows"] == 80 + 20 + 30 and int(record["distill_synthetic"]) == 30
    with pytest.raises(ValueError, match="distill_synthetic"):
        train_replacement("selena", ctx, {**params, "distill_on": "members", "distill_synthetic": "30"})


@pytest.mark.parametrize(("key", "value", "match"), [("label_cap", "0.3", "label_cap"),
                                                     ("distill_temperature", "0", "distill_temperature"),
                                                     ("relabel_folds", "1", "relabel_folds"),
                                                     ("distill_synthetic", "-5", "distill_synthetic")])  # fmt: skip
def test_bad_label_parameters_fail_before_any_submodel_trains(tmp_path: Path, key: str, value: str,
                                                              match: str) -> None:  # fmt: skip
    from defense_models.training.replacements import train_replacement

    ctx, _ = _replacement_context()
    with pytest.raises(ValueError, match=match):
        train_replacement("selena", ctx, {"K": "5", "L": "2", "cache": str(tmp_path), "distill_on": "both",
                                          key: value})  # fmt: skip
    assert not any(tmp_path.iterdir())  # nothing trained, nothing cached


def _trained_on(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, torch.Tensor]]:
    """Records (k, the rows [n, D] it trained on) for every sub-model SplitAI trains (not loads) from now."""
    calls: list[tuple[int, torch.Tensor]] = []
    train = SplitAI.train

    def recording(self: SplitAI, k: int, X_: torch.Tensor, y_: torch.Tensor, progress: bool) -> torch.nn.Module:
        if not self.cached(k):
            calls.append((k, X_[torch.from_numpy(trains_on(self.excluded, k))]))
        return train(self, k, X_, y_, progress)

    monkeypatch.setattr(SplitAI, "train", recording)
    return calls


def test_own_teachers_label_the_reference_without_any_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from defense_models.training.nets import predict_logits
    from defense_models.training.replacements import _own_labels, _selena_params

    ctx, X = _replacement_context()  # members X[:80], reference X[80:100]
    calls = _trained_on(monkeypatch)
    params = {"K": "5", "L": "2", "cache": str(tmp_path), "distill_epochs": "2", "reference_teachers": "own"}
    _, record = train_replacement_selena(ctx, {**params, "distill_on": "reference", "distill_synthetic": "6"})
    assert record["distill_rows"] == 20 + 6 and "reference_cache" not in record
    members = {tuple(row.tolist()) for row in X[:80]}
    assert len(calls) == 5 and all(not members & {tuple(r.tolist()) for r in rows} for _, rows in calls)
    teachers = own_teachers("small-mlp", ctx.data, ctx.fit_config, 20, 5, 2, tmp_path / "reference_teachers")
    models = [teachers.train(k, *ctx.reference, progress=False) for k in range(5)]  # loaded: none trains again
    assert len(calls) == 5
    probs = torch.stack([torch.softmax(predict_logits(m, ctx.reference[0]).double(), 1) for m in models])  # [5, 20, 4]
    crossovers = X[:3]  # any rows: labelled by all K
    p = _selena_params(ctx, {**params, "distill_on": "both"})
    labels = _own_labels(teachers_owner(ctx, p), p, ctx, torch.cat([ctx.reference[0], crossovers]))  # [23, 4]
    expected = torch.stack([probs[list(teachers.excluded[i]), i].mean(0) for i in range(20)])
    assert torch.allclose(labels[:20].double(), expected, atol=1e-6)  # each row: the L teachers that left it out
    for i, left_out in enumerate(teachers.excluded):
        row = ctx.reference[0][i]
        assert not any(bool((rows == row).all(1).any()) for k, rows in calls if k in left_out)
    everyone = torch.stack([torch.softmax(predict_logits(m, crossovers).double(), 1) for m in models]).mean(0)
    assert torch.allclose(labels[20:].double(), everyone, atol=1e-6)


def test_own_teachers_are_shared_by_models_with_other_members_and_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    ctx, X = _replacement_context()
    shared = str(tmp_path / "own")
    params = {"K": "5", "L": "2", "distill_epochs": "2", "distill_on": "both", "reference_teachers": "own",
              "reference_cache": shared}  # fmt: skip
    train_replacement_selena(ctx, {**params, "cache": str(tmp_path / "target")})
    calls = _trained_on(monkeypatch)
    other = replace(ctx, members=(X[:60], ctx.members[1][:60]), seed=7, fit_config=replace(ctx.fit_config, seed=7))
    train_replacement_selena(other, {**params, "cache": str(tmp_path / "reference_0")})
    assert len(calls) == 5  # the reference's own member sub-models only; its reference teachers were the target's
    members = {tuple(row.tolist()) for row in X[:60]}
    assert all({tuple(r.tolist()) for r in rows} <= members for _, rows in calls)


@pytest.mark.parametrize("teachers", ["all", "L", "own"])
def test_distill_on_chooses_the_rows_whatever_labels_them(tmp_path: Path, teachers: str) -> None:
    ctx, _ = _replacement_context()  # 80 members, 20 reference rows
    params = {"K": "5", "L": "2", "cache": str(tmp_path), "distill_epochs": "1", "reference_teachers": teachers}
    rows = {on: train_replacement_selena(ctx, {**params, "distill_on": on})[1]["distill_rows"]
            for on in ("reference", "both")}  # fmt: skip
    assert rows == {"reference": 20, "both": 100}


def test_own_teachers_need_reference_rows(tmp_path: Path) -> None:
    ctx, _ = _replacement_context()
    with pytest.raises(ValueError, match="reference_teachers=own"):
        train_replacement_selena(ctx, {"K": "5", "L": "2", "cache": str(tmp_path), "reference_teachers": "own"})
    assert not any(tmp_path.iterdir())


def test_a_submodel_is_the_same_whatever_was_trained_before(tmp_path: Path) -> None:
    data, X, y = _data()
    ex = exclusion_map(len(y), K=4, L=1, seed=0)
    config = FitConfig(epochs=2, batch_size=32, lr=1e-2)
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    alone = SplitAI("small-mlp", data, config, ex, 4, None).train(2, X, y, progress=False)
    after = SplitAI("small-mlp", data, config, ex, 4, None)
    after.train(0, X, y, progress=False)
    torch.randn(100)  # anything else drawing from the global generator in between
    assert torch.allclose(weights(alone), weights(after.train(2, X, y, progress=False)))  # a shard or a rerun


def _distillations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.nn.Module]]:
    """Records (rows [M, D], soft labels [M, C], the model) of every SELENA distillation from now on."""
    import defense_models.training.replacements as replacements

    runs: list[tuple[torch.Tensor, torch.Tensor, torch.nn.Module]] = []
    distill = replacements._selena_distill

    def recording(c: Any, p: dict[str, Any], Xd: torch.Tensor, soft: torch.Tensor, members: int) -> torch.nn.Module:
        runs.append((Xd, soft, model := distill(c, p, Xd, soft, members)))
        return model

    monkeypatch.setattr(replacements, "_selena_distill", recording)
    return runs


def train_replacement_selena(ctx: Any, params: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    from defense_models.training.replacements import train_replacement

    return train_replacement("selena", ctx, params)


def teachers_owner(ctx: Any, p: dict[str, Any]) -> SplitAI:
    """A members' SplitAI as ``_selena`` builds it (``_own_labels`` takes its architecture and recipe)."""
    return SplitAI(ctx.arch, ctx.data, ctx.fit_config, exclusion_map(80, 5, 2, ctx.seed), 5, None)


def test_two_splits_label_each_record_with_twice_the_teachers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from defense_models.training.nets import predict_logits

    data, X, y = _data()
    config = FitConfig(epochs=2, batch_size=32, lr=1e-2)
    one = Splits("small-mlp", data, config, len(y), 5, 2, seed=0, splits=1, cache=tmp_path)
    first, _ = one.soft_labels(X, y, progress=False)
    assert one.digest == map_digest(exclusion_map(len(y), 5, 2, seed=0))  # as before splits existed
    calls = _trained_on(monkeypatch)
    two = Splits("small-mlp", data, config, len(y), 5, 2, seed=0, splits=2, cache=tmp_path)
    soft, _ = two.soft_labels(X, y, progress=False)
    assert sorted(k for k, _ in calls) == list(range(5))  # map 0 came from the cache: only map 1 trained
    assert (tmp_path / "split_1").is_dir() and two.digest != one.digest
    maps = [part.excluded for part in two.parts]
    assert (maps[0] != maps[1]).any()  # another draw
    probs = [torch.stack([torch.softmax(predict_logits(part.train(k, X, y, False), X).double(), 1)
                          for k in range(5)]) for part in two.parts]  # fmt: skip
    for i in range(len(y)):  # the mean of 2 × L teachers, none of which saw record i
        expected = torch.cat([probs[m][list(maps[m][i]), i] for m in range(2)]).mean(0)
        assert torch.allclose(soft[i].double(), expected, atol=1e-6)
    assert torch.allclose(first, one.soft_labels(X, y, progress=False)[0])
    with pytest.raises(ValueError, match="splits"):
        Splits("small-mlp", data, config, len(y), 5, 2, seed=0, splits=0, cache=None)


def test_shards_deal_out_every_maps_submodels(tmp_path: Path) -> None:
    from defense_models.training.replacements import PartialWork

    ctx, _ = _replacement_context()
    params = {"K": "3", "L": "1", "splits": "2", "cache": str(tmp_path), "distill_epochs": "1"}
    for i in range(2):
        with pytest.raises(PartialWork):
            train_replacement_selena(ctx, {**params, "shard": f"{i}/2"})
    cached = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.safetensors"))
    assert cached == [f"{d}selena_{k:03d}.safetensors" for d in ("", "split_1/") for k in range(3)]
    _, record = train_replacement_selena(ctx, params)  # every sub-model is there: nothing trains
    assert int(record["splits"]) == 2


@pytest.mark.parametrize("relabel_by", ["selena", "selena_reference"])
def test_relabel_by_selena_labels_each_member_by_a_pipeline_that_never_saw_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relabel_by: str
) -> None:
    from defense_models.training.replacements import PartialWork, _fold_pipelines, _selena_params

    ctx, X = _replacement_context()  # members X[:80], reference X[80:100]
    params = {"K": "4", "L": "1", "cache": str(tmp_path), "distill_epochs": "2", "distill_on": "both",
              "relabel_folds": "2", "relabel_by": relabel_by}  # fmt: skip
    pipeline_rows = 40 + (20 if relabel_by == "selena_reference" else 0)  # the other fold, and the reference
    calls = _trained_on(monkeypatch)
    for shard in ("0/2", "1/2"):  # the folds' sub-models dealt out over two shards, then the distillation
        with pytest.raises(PartialWork):
            train_replacement_selena(ctx, {**params, "shard": shard})
    assert len(calls) == 2 * 4  # each fold's 4 sub-models, each trained once
    import defense_models.training.replacements as replacements

    distilled = _distillations(monkeypatch)
    _, record = train_replacement_selena(ctx, params)
    assert len(calls) == 2 * 4 and record["distill_rows"] == 100 and record["relabel_by"] == relabel_by
    assert record["trained_on_reference"]
    Xd, soft, _ = distilled[-1]  # [100, D], [100, 4]: the served model's rows and labels, the members first
    assert torch.equal(Xd, X[:100])
    from defense_models.training.nets import predict_logits

    pipelines = _fold_pipelines(ctx, _selena_params(ctx, params), *ctx.members)
    outputs = []
    for rows, sub, sub_p in pipelines:
        model = replacements._selena(sub, sub_p)[0]  # cached sub-models, seeded distillation: the same model
        probs = torch.softmax(predict_logits(model, X[:100]).double(), 1).float()  # [100, 4]
        assert torch.allclose(soft[rows], probs[rows], atol=1e-6)  # a member: its fold's pipeline
        outputs.append(probs[80:])
    assert torch.allclose(soft[80:], torch.stack(outputs).mean(0), atol=1e-6)  # a reference row: their mean
    assert len(record["exclusion_map"].split(",")) == 2
    trained = [{tuple(r.tolist()) for r in rows} for _, rows in calls]  # each sub-model's rows
    for rows, sub, _ in pipelines:
        fold = {tuple(r.tolist()) for r in X[rows]}
        assert len(sub.members[1]) == pipeline_rows and not fold & {tuple(r.tolist()) for r in sub.members[0]}
        reference = {tuple(r.tolist()) for r in X[80:100]}
        assert (reference <= {tuple(r.tolist()) for r in sub.members[0]}) == (relabel_by == "selena_reference")
        assert sum(not fold & seen for seen in trained) == 4  # its pipeline's 4 teachers never saw the fold
    assert all(any(not {tuple(r.tolist()) for r in X[rows]} & seen for rows, _, _ in pipelines) for seen in trained)
    with pytest.raises(ValueError, match=f"relabel_by={relabel_by} needs relabel_folds"):
        train_replacement_selena(ctx, {**params, "relabel_folds": "0"})
    with pytest.raises(ValueError, match="no distill_synthetic"):
        train_replacement_selena(ctx, {**params, "distill_synthetic": "5"})
    with pytest.raises(ValueError, match="relabel_by must be"):
        train_replacement_selena(ctx, {**params, "relabel_by": "teacher"})


@pytest.mark.parametrize("relabel_by", ["selena", "selena_reference"])
def test_pipeline_label_teachers_labels_a_fold_by_the_mean_of_its_pipelines_sub_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relabel_by: str
) -> None:
    """``pipeline_label=teachers``: a fold-f member's label is the mean softmax of all K of pipeline f's
    sub-models (none saw fold f); a reference row's the mean over pipelines of its own SELENA label there; no
    pipeline is distilled, only the served model."""
    from defense_models.training.replacements import _fold_pipelines, _selena_params, _splits

    ctx, X = _replacement_context()  # members X[:80], reference X[80:100]
    params = {"K": "4", "L": "1", "cache": str(tmp_path), "distill_epochs": "2", "distill_on": "both",
              "relabel_folds": "2", "relabel_by": relabel_by, "pipeline_label": "teachers"}  # fmt: skip
    distilled = _distillations(monkeypatch)
    calls = _trained_on(monkeypatch)
    _, record = train_replacement_selena(ctx, params)
    assert len(distilled) == 1 and len(calls) == 2 * 4  # the served model only; each pipeline's 4 sub-models
    assert record["pipeline_label"] == "teachers" and len(record["exclusion_map"].split(",")) == 2
    Xd, soft, _ = distilled[0]  # [100, D], [100, 4]
    assert torch.equal(Xd, X[:100])
    references = []
    for rows, sub, sub_p in _fold_pipelines(ctx, _selena_params(ctx, params), *ctx.members):
        split_ai = _splits(sub, sub_p)
        teachers = [split_ai.parts[0].train(k, *sub.members, False) for k in range(4)]  # from the cache
        probs = torch.stack([torch.softmax(m(X[:100]).double(), 1) for m in teachers]).detach()  # [4, 100, 4]
        assert torch.allclose(soft[rows], probs.mean(0)[rows].float(), atol=1e-6)
        if relabel_by == "selena_reference":  # its records end with the reference rows: the L = 1 that left it out
            left_out = torch.from_numpy(split_ai.parts[0].excluded[-20:, 0])  # [20]
            references.append(probs[left_out, torch.arange(80, 100)])
        else:
            references.append(probs.mean(0)[80:])
    assert torch.allclose(soft[80:], torch.stack(references).mean(0).float(), atol=1e-6)
    with pytest.raises(ValueError, match="pipeline_label must be"):
        train_replacement_selena(ctx, {**params, "pipeline_label": "student"})
    with pytest.raises(ValueError, match="needs relabel_by=selena or selena_reference"):
        train_replacement_selena(ctx, {**params, "relabel_by": "student", "relabel_folds": "0"})


def test_matched_teachers_tempers_each_folds_labels_to_the_served_models_confidence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pipeline_label=matched_teachers``, ``match_rounds=2``: a first served model on the teachers' labels;
    fold f's member labels tempered by the T_f that brings its teachers' mean log-odds on the validation rows to
    that model's there; a second served model on those labels and new T_f fitted to it; the reference rows'
    labels never changed; every round's temperatures recorded."""
    import defense_models.training.replacements as replacements
    from defense_models.training.nets import predict_probs

    ctx, _ = _replacement_context()  # members X[:80], reference X[80:100], validation X[100:]
    params = {"K": "4", "L": "1", "cache": str(tmp_path), "distill_epochs": "2", "distill_on": "both",
              "relabel_folds": "2", "relabel_by": "selena_reference"}  # fmt: skip
    runs = _distillations(monkeypatch)
    train_replacement_selena(ctx, {**params, "pipeline_label": "teachers"})
    _, record = train_replacement_selena(ctx, {**params, "pipeline_label": "matched_teachers", "match_rounds": "2"})
    teachers = runs[0][1]
    assert len(runs) == 1 + 3 and torch.equal(runs[1][1], teachers)  # round 1 distills the teachers recipe's labels
    rounds = record["label_temperature_rounds"]
    assert len(rounds) == 2 and record["label_temperatures"] == rounds[-1] and int(record["match_rounds"]) == 2
    X_val, y_val = ctx.validation
    pipelines = replacements._fold_pipelines(ctx, replacements._selena_params(ctx, params), *ctx.members)
    for r, ((_, _, served), (_, labels, _)) in enumerate(pairwise(runs[1:])):  # each round and the next distillation
        target = float(log_odds(predict_probs(served, X_val).float(), y_val).mean())
        for (rows, sub, sub_p), t in zip(pipelines, rounds[r], strict=True):
            val_soft = replacements._splits(sub, sub_p).soft_labels(*sub.members, False, X_val)[1]
            assert val_soft is not None and _grid_neighbours(t, matched_temperature(val_soft, y_val, target))
            assert torch.allclose(labels[rows], tempered(teachers[rows], t), atol=1e-6)
        assert torch.equal(labels[80:], teachers[80:])
    with pytest.raises(ValueError, match="match_rounds must be >= 1"):
        train_replacement_selena(ctx, {**params, "pipeline_label": "matched_teachers", "match_rounds": "0"})


def _grid_neighbours(t: float, refit: float) -> bool:
    """The fitted T and a refit on a batch of another shape: the same ``TEMPERATURES`` point, or (when the target
    sits within float error of a midpoint) the next one."""
    step = float(np.log(TEMPERATURES[1] / TEMPERATURES[0]))
    return abs(float(np.log(t / refit))) <= step * 1.001


def test_matched_distilled_tempers_the_students_mean_to_the_served_models_confidence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pipeline_label=matched_distilled students=2``: the labels of ``students=2`` (distilled by the first round
    as they are), fold f's member labels then tempered by the T_f that brings its students' mean log-odds on the
    validation rows to that served model's; the reference rows' labels unchanged."""
    import defense_models.training.replacements as replacements
    from defense_models.training.nets import predict_probs

    ctx, _ = _replacement_context()  # members X[:80], reference X[80:100], validation X[100:]
    params = {"K": "4", "L": "1", "cache": str(tmp_path), "distill_epochs": "2", "distill_on": "both",
              "relabel_folds": "2", "relabel_by": "selena_reference", "students": "2"}  # fmt: skip
    runs = _distillations(monkeypatch)
    train_replacement_selena(ctx, params)
    plain = runs[-1][1]  # [100, 4]: the students' labels
    del runs[:]
    _, record = train_replacement_selena(ctx, {**params, "pipeline_label": "matched_distilled"})
    assert len(runs) == 2 * 2 + 2 and torch.equal(runs[-2][1], plain)  # the students, one round, the model
    (t_folds,) = record["label_temperature_rounds"]
    X_val, y_val = ctx.validation
    target = float(log_odds(predict_probs(runs[-2][2], X_val).float(), y_val).mean())
    labels = runs[-1][1]
    students = [m for _, _, m in runs[:4]]  # pipeline 0's two students, then pipeline 1's
    pipelines = replacements._fold_pipelines(ctx, replacements._selena_params(ctx, params), *ctx.members)
    for f, ((rows, _, _), t) in enumerate(zip(pipelines, t_folds, strict=True)):
        val = torch.stack([predict_probs(m, X_val).float() for m in students[2 * f:2 * f + 2]]).mean(0)  # [V, 4]
        assert _grid_neighbours(t, matched_temperature(val, y_val, target))
        assert torch.allclose(labels[rows], tempered(plain[rows], t), atol=1e-6)
    assert torch.equal(labels[80:], plain[80:])
    with pytest.raises(ValueError, match="students S >= 1"):
        train_replacement_selena(ctx, {**params, "pipeline_label": "matched_teachers"})


def test_students_average_several_distilled_models_of_each_fold_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``students=2``: a fold's member labels (and the reference rows' share) are the mean of its pipeline's
    distilled model and a second one distilled on the same labels from seed + STUDENT_SEED."""
    import defense_models.training.replacements as replacements
    from defense_models.training.nets import predict_probs

    ctx, X = _replacement_context()  # members X[:80], reference X[80:100]
    params = {"K": "4", "L": "1", "cache": str(tmp_path), "distill_epochs": "2", "distill_on": "both",
              "relabel_folds": "2", "relabel_by": "selena_reference", "students": "2"}  # fmt: skip
    served = _distillations(monkeypatch)
    _, record = train_replacement_selena(ctx, params)
    assert len(served) == 2 * 2 + 1 and int(record["students"]) == 2  # two students per pipeline, then the model
    labels, references = served[-1][1], []
    for rows, sub, sub_p in replacements._fold_pipelines(ctx, replacements._selena_params(ctx, params), *ctx.members):
        first = replacements._selena(sub, sub_p)[0]
        Xd, soft = replacements._distillation_set(replacements._splits(sub, sub_p), sub_p, sub, *sub.members)
        second = replacements._selena_distill(replace(sub, seed=sub.seed + replacements.STUDENT_SEED), sub_p, Xd, soft,
                                              len(Xd))  # fmt: skip
        mean = (predict_probs(first, X[:100]).float() + predict_probs(second, X[:100]).float()) / 2  # [100, 4]
        assert torch.allclose(labels[rows], mean[rows], atol=1e-6)
        references.append(mean[80:])
    assert torch.allclose(labels[80:], torch.stack(references).mean(0), atol=1e-6)
    for bad in ({"students": "0"}, {"pipeline_label": "teachers"}, {"relabel_by": "student"}):
        with pytest.raises(ValueError, match="students S >= 1"):
            train_replacement_selena(ctx, {**params, **bad})
