"""The offline job end to end, on small data: train → export → serve; advreg; shadows; user models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from defense_models.bundle.train import train_bundle
from defense_models.training import defenders, recipes
from defense_models.training.adv_reg import AdvRegConfig, train_adv_reg
from defense_models.training.data import load_dataset, memguard_split
from defense_models.training.loop import FitConfig, fit
from defense_models.training.nets import predict_logits
from defense_models.training.recipes import TrainConfig
from gateway.artifacts import load_bundle
from tests.conftest import make_settings, serving

SECRET = "0123456789abcdef0123456789abcdef"


def _sweep_rows(out: Path) -> list[dict[str, Any]]:
    """sweep.json through its typed contract, as plain dicts."""
    from defense_models.audit.schema import Sweep, read

    return [r.model_dump() for r in read(Sweep, out / "sweep.json").rows]


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable tabular task (4 classes, 12 features) as a user's .npz."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 600)
    X = rng.normal(size=(600, 12)) + np.eye(4, 12)[y] * 1.5
    path = tmp_path_factory.mktemp("data") / "mine.npz"
    np.savez(path, X=X, y=y)
    return path


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short fits so the tests stay fast; the recipes themselves are exercised by the results run."""
    fast = FitConfig(epochs=15, batch_size=64, lr=1e-3)
    monkeypatch.setitem(recipes.RECIPES, ("tabular", "official"), ("small-mlp", fast))
    q = defenders.DEFENDER_RECIPES["quick"]
    short = defenders.DefenderRecipes(replace(q.g, fit=replace(q.g.fit, epochs=10)),
                                      replace(q.substitute, fit=replace(q.substitute.fit, epochs=10)))  # fmt: skip
    monkeypatch.setitem(defenders.DEFENDER_RECIPES, "quick", short)


async def test_train_export_serve_matches_torch(tabular: Path, tmp_path: Path, quick: None) -> None:
    # The tiny tabular target barely leaks, so its defenses fail the quality gate: written anyway.
    config = TrainConfig(dataset="tabular", data_path=str(tabular), preset="demo", progress=False,
                         allow_weak_defense=True)  # fmt: skip
    result = train_bundle(config, tmp_path / "bundle")
    bundle = load_bundle(tmp_path / "bundle")
    m = bundle.manifest
    assert (m.name, m.input.width, m.output.classes, m.output.kind) == ("mine-demo", 12, 4, "logits")
    assert {
        "model.onnx",
        "memguard_g.safetensors",
        "aeppt_substitute.safetensors",
        "rank_template.safetensors",
        "split.npz",
    } == set(m.files)
    assert set(m.defenses) == {"none", "memguard", "aeppt", "rank_template", "hamp"}
    t = m.training
    assert t is not None and t.split is not None and t.dataset is not None and t.accuracy.train is not None
    assert t.split.name == "random" and t.split.sizes["target_train"] == 120
    assert t.accuracy.train > 0.5 and t.dataset.sha256 == load_dataset("tabular", tabular).sha256
    assert {"mi-gateway", "torch", "onnxruntime"} <= set(t.versions)
    with np.load(tmp_path / "bundle" / "split.npz") as f:
        assert np.array_equal(f["target_train"], result.split.parts["target_train"])

    x = np.random.default_rng(1).normal(size=(7, 12)).astype(np.float32)
    want = torch.softmax(predict_logits(result.model, torch.from_numpy(x)).double(), 1).numpy()
    async with serving(make_settings(tmp_path / "bundle")) as (client, _):
        got = np.array((await client.post("/predict", json={"instances": x.tolist()})).json()["probabilities"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    for defense in ("memguard", "aeppt"):
        async with serving(make_settings(tmp_path / "bundle", defense=defense, noise_secret=SECRET)) as (client, _):
            r = (await client.post("/predict", json={"instances": x.tolist()})).json()
        assert r["labels"] == want.argmax(1).tolist()


def test_adversarial_regularization_lowers_a_simple_attack() -> None:
    """A small target overfits 300 Location30 rows; AdvReg's replacement leaks less to a confidence attack."""
    d = load_dataset("location30")
    parts = memguard_split().parts

    def rows(role: str, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
        idx = parts[role][:n]
        return torch.from_numpy(d.X[idx]), torch.from_numpy(d.y[idx])

    def attack(model: torch.nn.Module) -> float:  # best-threshold max-confidence attack, balanced accuracy
        conf_in = torch.softmax(predict_logits(model, rows("target_train")[0]), 1).max(1).values
        conf_out = torch.softmax(predict_logits(model, rows("eval_nonmember")[0]), 1).max(1).values
        return max(0.5 * float((conf_in >= t).float().mean() + (conf_out < t).float().mean())
                   for t in torch.cat([conf_in, conf_out]).unique())  # fmt: skip

    def small() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(446, 128), torch.nn.ReLU(), torch.nn.Linear(128, 30))

    plain = small()
    fit(plain, *rows("target_train"), FitConfig(epochs=40, batch_size=64, lr=1e-3))
    defended = small()
    train_adv_reg(defended, rows("target_train"), rows("target_test"), rows("validation"), 30,
                  AdvRegConfig(lam=3.0, k=3, epochs=40, batch_size=64))  # fmt: skip
    a_plain, a_adv = attack(plain), attack(defended)
    assert a_plain > 0.7, a_plain  # the plain model overfits and leaks
    assert a_adv < a_plain - 0.05, (a_plain, a_adv)


def test_shadows_split_across_shards_and_resume(tmp_path: Path, quick: None, tabular: Path) -> None:
    from defense_models.training.recipes import parse_shard
    from defense_models.training.shadows import ShadowSpec, in_mask, load_shadows, train_shadows

    config = TrainConfig(dataset="tabular", data_path=str(tabular), progress=False)
    spec = ShadowSpec(count=5)
    assert train_shadows(config, spec, tmp_path, parse_shard("1/2")) == [1, 3]
    assert train_shadows(config, spec, tmp_path, parse_shard("0/2")) == [0, 2, 4]
    assert train_shadows(config, spec, tmp_path, parse_shard("0/2")) == []  # idempotent on retry
    shadows = load_shadows(tmp_path, load_dataset("tabular", tabular))
    assert [meta.index for _, meta in shadows] == [0, 1, 2, 3, 4]
    masks = np.array([meta.in_mask for _, meta in shadows])
    assert np.array_equal(masks[3], in_mask(3, masks.shape[1], 0.5, 0))
    assert abs(masks.mean() - 0.5) < 0.01 and not np.array_equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="0 <= i < N"):
        parse_shard("2/2")
    with pytest.raises(ValueError, match="like i/N"):
        parse_shard("two")


def test_a_bad_shard_is_one_error_line(tmp_path: Path, tabular: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from defense_models.__main__ import main

    assert main(["shadows", "--dataset", "tabular", "--data", str(tabular), "--count", "2", "--shard", "2/2",
                 "--out", str(tmp_path / "refs")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: --shard 2/2: need 0 <= i < N") and "Traceback" not in err


def test_shadows_copy_a_replacement(tmp_path: Path, quick: None, tabular: Path) -> None:
    """`shadows --replacement`: each reference is that training-time defense on its half, loadable for LiRA."""
    from defense_models.audit.queries import _replacement_of, check_references
    from defense_models.training.shadows import ShadowSpec, load_shadows, train_shadows

    base = TrainConfig(dataset="tabular", data_path=str(tabular), progress=False)
    selena = replace(base, replacement="selena",
                     replacement_params={"K": 3, "L": 1, "sub_epochs": 2, "cache": str(tmp_path / "sub")})  # fmt: skip
    assert train_shadows(selena, ShadowSpec(count=2), tmp_path / "selena") == [0, 1]
    refs = load_shadows(tmp_path / "selena", load_dataset("tabular", tabular))
    digests = {meta.replacement["exclusion_map"] for _, meta in refs}
    assert len(digests) == 2  # each shadow draws its own map from its own seed
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["shadow_0000", "shadow_0001"]
    assert _replacement_of(refs) == "selena (K=3, L=1, sub_epochs=2)"  # where the cache is: not what was trained
    with pytest.raises(ValueError, match="holds shadows trained with"):  # one kind of reference per directory
        train_shadows(base, ShadowSpec(count=3), tmp_path / "selena")

    hamp = replace(base, replacement="hamp", replacement_params={"epochs": 2, "milestones": ""})
    assert train_shadows(hamp, ShadowSpec(count=1), tmp_path / "hamp") == [0]
    (model, meta), = load_shadows(tmp_path / "hamp", load_dataset("tabular", tabular))
    assert meta.architecture == "purchase-mlp" and isinstance(model[1], torch.nn.Tanh)  # HAMP's own network
    with pytest.raises(ValueError, match="stack of three networks"):
        train_shadows(replace(base, replacement="stacking"), ShadowSpec(count=1), tmp_path / "stack")
    with pytest.raises(ValueError, match="scale out with --shard"):
        train_shadows(replace(selena, replacement_params={"shard": "0/2", "cache": "x"}), ShadowSpec(count=1),
                      tmp_path / "sharded")  # fmt: skip
    mixed = refs[:1] + load_shadows(tmp_path / "hamp", load_dataset("tabular", tabular))
    with pytest.raises(ValueError, match="mix trainings"):
        _replacement_of(mixed)
    metas = [meta.model_copy(update={"count": 6}) for _, meta in refs] * 2  # 4 of 6: a shard has not finished
    with pytest.raises(ValueError, match="4 of the 6 reference models"):
        check_references(metas, tmp_path)
    check_references(metas + metas[:2], tmp_path)


def test_shadows_share_selenas_own_reference_teachers(tmp_path: Path, quick: None, tabular: Path) -> None:
    """`reference_teachers=own` teachers depend on no member: every reference loads the one set in
    `reference_cache`, and where it is stays out of what the shadows were asked for."""
    from defense_models.training.shadows import ShadowSpec, load_shadows, train_shadows

    own = tmp_path / "own"
    selena = TrainConfig(dataset="tabular", data_path=str(tabular), progress=False, replacement="selena",
                         replacement_params={"K": 3, "L": 1, "sub_epochs": 2, "cache": str(tmp_path / "sub"),
                                             "distill_on": "both", "reference_teachers": "own",
                                             "reference_cache": str(own)})  # fmt: skip
    assert train_shadows(selena, ShadowSpec(count=2), tmp_path / "refs") == [0, 1]
    assert sorted(p.name for p in own.iterdir()) == [f"selena_{k:03d}.{ext}" for k in range(3) for ext in
                                                     ("json", "safetensors")]  # fmt: skip
    assert not any((tmp_path / "sub" / "shadow_0000").glob("reference_teachers"))
    for _, meta in load_shadows(tmp_path / "refs", load_dataset("tabular", tabular)):
        assert "reference_cache" not in meta.request.params and "reference_cache" not in meta.replacement
        assert meta.replacement["reference_teachers"] == "own"


async def test_export_a_users_onnx_model(tmp_path: Path, quick: None) -> None:
    from defense_models.bundle.byo import export_user_model
    from defense_models.bundle.export import export_onnx
    from defense_models.bundle.quality import WeakDefenseError
    from defense_models.bundle.train import defender_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    (tmp_path / "mine.onnx").write_bytes(export_onnx(model, 6))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", X=rng.normal(size=(80, 6)), y=rng.integers(0, 3, 80))
    np.savez(tmp_path / "out.npz", X=rng.normal(size=(80, 6)))
    config = defender_config(TrainConfig(preset="demo", progress=False))
    with pytest.raises(WeakDefenseError, match="no better than chance"):  # random rows: nothing leaks
        export_user_model(tmp_path / "mine.onnx", tmp_path / "in.npz", tmp_path / "out.npz",
                          tmp_path / "bundle", name="mine", output_kind="logits", config=config)  # fmt: skip
    assert not (tmp_path / "bundle").exists()
    config = replace(config, allow_weak_defense=True)
    summary = export_user_model(tmp_path / "mine.onnx", tmp_path / "in.npz", tmp_path / "out.npz",
                                tmp_path / "bundle", name="mine", output_kind="logits", config=config)  # fmt: skip
    assert summary["classes"] == "3"
    m = load_bundle(tmp_path / "bundle").manifest
    assert (m.input.width, m.output.classes, m.input.name) == (6, 3, "input")
    assert (tmp_path / "bundle" / "model.onnx").read_bytes() == (tmp_path / "mine.onnx").read_bytes()
    x = rng.normal(size=(4, 6)).astype(np.float32)
    async with serving(make_settings(tmp_path / "bundle", defense="memguard", noise_secret=SECRET)) as (client, _):
        r = (await client.post("/predict", json={"instances": x.tolist()})).json()
    assert r["labels"] == model(torch.from_numpy(x)).argmax(1).tolist()
    with pytest.raises(ValueError, match="not distributions"):
        export_user_model(tmp_path / "mine.onnx", tmp_path / "in.npz", tmp_path / "out.npz", tmp_path / "b2",
                          name="mine", output_kind="probabilities", config=config)  # fmt: skip


def test_cli_info_prints_the_manifest(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from defense_models.__main__ import main

    assert main(["info", str(tiny_bundle)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny"


def test_cli_train_with_advreg_replacement(tabular: Path, tmp_path: Path, quick: None) -> None:
    from defense_models.__main__ import main

    args = ["train", "--dataset", "tabular", "--data", str(tabular), "--preset", "demo", "--replacement", "advreg",
            "--advreg-lambda", "1", "--advreg-epochs", "4", "--defense", "memguard", "--quiet",
            "--allow-weak-defense", "--out", str(tmp_path / "b")]  # fmt: skip
    assert main(args) == 0
    m = load_bundle(tmp_path / "b").manifest
    assert set(m.defenses) == {"none", "memguard"}
    assert m.training is not None
    rep = m.training.replacement
    assert rep["kind"] == "advreg" and rep["config"]["lam"] == 1 and rep["config"]["warmup_epochs"] == 2
    assert m.training.accuracy.plain is not None
    full = rep["reference_size"]
    # Nasr Table 7's knob: a smaller reference set
    assert main([*args, "--replacement-param", "reference_size=20", "--replacement-param", "lam=2"]) == 0
    training = load_bundle(tmp_path / "b").manifest.training
    assert training is not None
    rep = training.replacement
    assert rep["reference_size"] == 20 < full and rep["config"]["lam"] == 2


@pytest.mark.parametrize(("param", "says"), [("label_cap=0.3", "label_cap must be in [0.5, 1]"),
                                             ("bogus=1", "unknown parameters ['bogus']"),
                                             ("reference_teachers=own", "distill_on=members has none")])  # fmt: skip
def test_a_bad_replacement_param_is_one_error_line(
    tabular: Path, tmp_path: Path, quick: None, capsys: pytest.CaptureFixture[str], param: str, says: str
) -> None:
    """A typo in --replacement-param is the user's input: exit 2 and one line naming it, no traceback, no bundle."""
    from defense_models.__main__ import main

    assert main(["train", "--dataset", "tabular", "--data", str(tabular), "--quiet", "--defense", "none",
                 "--replacement", "selena", "--replacement-param", f"cache={tmp_path / 'sub'}",
                 "--replacement-param", param, "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "sub").exists()  # failed before any work


def test_audit_runs_attacks_and_writes_reports(tabular: Path, tmp_path: Path, quick: None) -> None:
    from defense_models.__main__ import main
    from defense_models.audit.report import PLOTS

    assert main(["train", "--dataset", "tabular", "--data", str(tabular), "--preset", "demo", "--quiet",
                 "--allow-weak-defense", "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    for defense in ("none", "memguard"):
        out = tmp_path / f"report-{defense}"
        args = ["audit", "--bundle", str(tmp_path / "b"), "--defense", defense, "--shadow-epochs", "5",
                "--attacks", "gap", "confidence", "entropy", "--quiet", "--out", str(out)]  # fmt: skip
        assert main(args + (["--adaptive", "--param", "epsilon=0.5"] if defense != "none" else
                            ["--views", "shadow", "known"])) == 0  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        u = report["utility"]
        views = ["shadow", "known"] if defense == "none" else ["shadow", "adaptive", "flipped", "known", "rounded",
                                                               "repeated"]  # fmt: skip
        assert list(report["views"]) == views
        assert set(report["attacks"]) == {f"{v}/{a}" for v in views for a in ("gap", "confidence", "entropy")}
        assert u["label_loss"] == 0.0
        assert report["attacks"]["shadow/gap"]["oracle_balanced_accuracy"] == pytest.approx(u["label_only_floor"])
        assert (u["l1"]["mean"] == 0) == (defense == "none")
        assert "Label-only floor" in (out / "report.md").read_text()
        for plot in PLOTS:
            assert (out / plot).stat().st_size > 5_000, plot  # a real figure, not an empty file
        with np.load(out / "scores.npz") as f:
            assert f["shadow/confidence/members"].shape == (report["sets"]["members"],)
        if defense == "memguard":
            assert report["defense_params"] == {"epsilon": 0.5}
            assert u["exact_repeats_identical"] == 1.0  # keyed noise: an exact repeat gets the same answer
            assert u["l1"]["mean"] <= 0.5 + 0.1  # ε bounds the expected L1
            assert report["attacks"]["flipped/confidence"]["orientation"] in (-1.0, 1.0)


def test_audit_label_only_and_lira_attacks(tmp_path: Path) -> None:
    from defense_models.__main__ import main

    recipe = ["--dataset", "location30", "--preset", "demo", "--epochs", "8", "--quiet"]
    defenses = ["--defense", "hamp", "--defense", "rank_template"]
    assert main(["train", *recipe, *defenses, "--out", str(tmp_path / "b")]) == 0
    assert main(["shadows", *recipe, "--count", "4", "--out", str(tmp_path / "refs")]) == 0
    out = tmp_path / "report"
    assert main(["audit", "--bundle", str(tmp_path / "b"), "--defense", "rounding", "--param", "decimals=1",
                 "--shadow-epochs", "8", "--attacks", "gap", "--label-only", "--label-only-rows", "60",
                 "--label-only-copies", "4", "--label-only-queries", "80", "--lira-shadows", str(tmp_path / "refs"),
                 "--quiet", "--no-plots", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    nr = report["attacks"]["label-only/noise_robustness"]
    assert nr["queries_to_target"] == 4 * 120 and nr["flip_rate"] > 0 and nr["n_members"] == 60
    bd = report["attacks"]["label-only/boundary_distance"]
    assert bd["queries_per_row"] <= 80 and bd["auc"] > 0.5
    for key in ("reference/lira_online", "reference/lira_offline", "reference/lira_label"):
        assert report["attacks"][key]["reference_models"] == 4
        assert report["attacks"][key]["reference_replacement"] == "none"
        assert report["attacks"][key]["auc"] > 0.55, report["attacks"][key]

    # HAMP against the attacker who knows the rule (adaptive: its shadow model on keyed random inputs), the
    # known-records attacker, jittered repeats and LiRA (each reference model defends its own outputs).
    out = tmp_path / "hamp"
    assert main(["audit", "--bundle", str(tmp_path / "b"), "--defense", "hamp", "--shadow-epochs", "8",
                 "--attacks", "gap", "confidence", "--views", "shadow", "adaptive", "known", "repeated",
                 "--lira-shadows", str(tmp_path / "refs"), "--quiet", "--no-plots",
                 "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    u = report["utility"]
    assert list(report["views"]) == ["shadow", "adaptive", "known", "repeated", "reference"]
    assert u["label_loss"] == 0 and u["top5_accuracy"] == u["undefended_top5_accuracy"] and u["ece"] is not None
    # hamp keys on the input: each jittered copy is its own draw, from a distribution the row does not set, so
    # averaging the copies reads no more than the label does
    assert u["exact_repeats_identical"] == 1.0 and u["near_repeats_agree"] < 0.1, u
    assert report["attacks"]["repeated/confidence"]["balanced_accuracy"] <= u["label_only_floor"] + 0.01
    rounding = json.loads((tmp_path / "report" / "report.json").read_text())["attacks"]["reference/lira_label"]
    assert report["attacks"]["reference/lira_label"]["auc"] == rounding["auc"]  # the label alone: any such defense


def test_sweep_plan_writes_the_table_and_the_curves(tabular: Path, tmp_path: Path, quick: None) -> None:
    from defense_models.__main__ import main

    assert main(["train", "--dataset", "tabular", "--data", str(tabular), "--preset", "demo", "--quiet",
                 "--allow-weak-defense", "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    plan = tmp_path / "plan.toml"
    plan.write_text(f"""
bundle = "{tmp_path / "b"}"
[audit]
attacks = ["gap", "confidence"]
views = ["shadow", "adaptive"]
shadow_epochs = 5
[[setting]]
label = "none"
[[setting]]
label = "rounding 1"
defense = "rounding"
params = {{ decimals = 1 }}
""")
    assert main(["sweep", "--plan", str(plan), "--quiet", "--out", str(tmp_path / "s")]) == 0
    rows = _sweep_rows(tmp_path / "s")
    assert [r["setting"] for r in rows] == ["none", "rounding 1"]
    assert set(rows[1]["attacks"]) == {"shadow/gap", "shadow/confidence", "adaptive/gap", "adaptive/confidence"}
    assert all(r["label_loss"] == 0 for r in rows) and rows[0]["mean_l1"] == 0 < rows[1]["mean_l1"]
    md = (tmp_path / "s" / "sweep.md").read_text()
    assert "[rounding 1](rounding_1/report.md)" in md and "TPR at 0.1% FPR" in md
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 5_000
    assert (tmp_path / "s" / "rounding_1" / "roc.png").exists()
    report = tmp_path / "s" / "rounding_1" / "report.json"
    before = report.stat().st_mtime_ns
    assert main(["sweep", "--plan", str(plan), "--quiet", "--resume", "--out", str(tmp_path / "s")]) == 0
    assert report.stat().st_mtime_ns == before  # read back, not audited again
    assert _sweep_rows(tmp_path / "s") == rows

    # parts side by side into one directory: the table appears once every setting has a report
    part = ["sweep", "--plan", str(plan), "--quiet", "--out", str(tmp_path / "p")]
    assert main([*part, "--shard", "1/2"]) == 0
    assert (tmp_path / "p" / "rounding_1" / "report.json").exists() and not (tmp_path / "p" / "sweep.md").exists()
    assert not (tmp_path / "p" / "none").exists()
    assert main([*part, "--setting", "none"]) == 0
    assert [r["setting"] for r in _sweep_rows(tmp_path / "p")] == ["none", "rounding 1"]
    with pytest.raises(SystemExit, match="no setting labelled"):
        main([*part, "--setting", "nonee"])

    # what a setting needs is checked before the first audit: a missing reference set fails in seconds
    bad = tmp_path / "bad.toml"
    bad.write_text(plan.read_text() + f'audit = {{ lira_shadows = "{tmp_path / "no-refs"}" }}\n')
    with pytest.raises(ValueError, match="at least 4 reference models"):
        main(["sweep", "--plan", str(bad), "--quiet", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad" / "none").exists()  # the setting before it was not audited

    # the command-line grid: one curve over a parameter
    assert main(["sweep", "--bundle", str(tmp_path / "b"), "--defense", "memguard", "--param", "epsilon",
                 "--values", "0.2", "1", "--attacks", "confidence", "--shadow-epochs", "5", "--quiet",
                 "--out", str(tmp_path / "g")]) == 0  # fmt: skip
    rows = _sweep_rows(tmp_path / "g")
    assert [(r["curve"], r["x"], r["params"]) for r in rows] == [
        ("memguard epsilon", 0.2, {"epsilon": 0.2}),
        ("memguard epsilon", 1.0, {"epsilon": 1}),
    ]
    assert rows[0]["mean_l1"] <= rows[1]["mean_l1"] + 1e-9  # a smaller budget distorts less


def test_sweep_plan_errors_name_the_fix(tmp_path: Path) -> None:
    from defense_models.audit.sweep import load_plan

    plan = tmp_path / "p.toml"
    plan.write_text('bundle = "x"\n[audit]\nattaks = ["gap"]\n[[setting]]\nlabel = "a"\n')
    with pytest.raises(ValueError, match="unknown \\[audit\\] keys \\['attaks'\\]"):
        load_plan(plan)
    plan.write_text('bundle = "x"\n')
    with pytest.raises(ValueError, match="at least one"):
        load_plan(plan)


@pytest.mark.parametrize(
    ("kind", "params"),
    [("l2", ["lam=0.01"]), ("dropout", ["p=0.3"]), ("stacking", ["combiner_epochs=5"]),
     ("dpsgd", ["epsilon=4", "epochs=3"]), ("hamp", ["epochs=3", "arch=small-mlp", "lr=0.05"]),
     ("relaxloss", ["epochs=4", "alpha=0.5"]), ("selena", ["K=4", "L=2", "sub_epochs=1"])],
)  # fmt: skip
def test_training_time_defenses_export_bundles_the_gateway_serves(
    kind: str, params: list[str], tabular: Path, tmp_path: Path, quick: None
) -> None:
    from defense_models.__main__ import main
    from defense_models.audit.predictors import GatewayPredictor, RawOnnxPredictor

    args = ["train", "--dataset", "tabular", "--data", str(tabular), "--preset", "demo", "--defense", "none",
            "--quiet", "--replacement", kind, "--out", str(tmp_path / "b")]  # fmt: skip
    for p in params:
        args += ["--replacement-param", p]
    assert main(args) == 0
    m = load_bundle(tmp_path / "b").manifest
    assert m.training is not None
    rep = m.training.replacement
    assert rep["kind"] == kind and m.training.accuracy.plain is not None
    if kind == "dpsgd":
        assert np.isfinite(rep["epsilon"]) and 0 < rep["epsilon"] <= 4 + 1e-6 and rep["noise_multiplier"] > 0
    if kind == "hamp":
        assert 0.5 < rep["true_class_probability"] < 1 and rep["best_epoch"] in range(3)
    if kind == "selena":
        assert rep["K"] == 4 and rep["L"] == 2 and rep["sub_epochs"] == 1 and len(rep["exclusion_map"]) == 16
        assert (rep["distill_optimizer"], rep["distill_lr"], rep["distill_epochs"]) == ("adam", 1e-3, 60)  # authors'
    if kind == "stacking":
        assert sum(rep["parts"]) == len(np.load(tmp_path / "b" / "split.npz")["target_train"])
    X = np.random.default_rng(0).normal(size=(32, 12)).astype(np.float32)
    with GatewayPredictor.in_process(tmp_path / "b", defense="none", demo=True) as served:
        np.testing.assert_allclose(served.predict(X), RawOnnxPredictor(tmp_path / "b").predict(X), atol=1e-5)


def test_unknown_replacement_parameters_are_refused(tabular: Path, tmp_path: Path, quick: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from defense_models.__main__ import main

    assert main(["train", "--dataset", "tabular", "--data", str(tabular), "--preset", "demo", "--defense", "none",
                 "--quiet", "--replacement", "l2", "--replacement-param", "lambda=1",
                 "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    assert "unknown parameters ['lambda']; known: ['lam']" in capsys.readouterr().err


def test_comparison_plan_over_defenses_and_attacker_data(tabular: Path, tmp_path: Path, quick: None) -> None:
    """The defense comparison on a tiny configuration: a training-time defense's bundle next to the plain
    one, and the Shokri attack under attacker-data sources that query the endpoint."""
    from defense_models.__main__ import main

    train = [
        "train",
        "--dataset",
        "tabular",
        "--data",
        str(tabular),
        "--preset",
        "demo",
        "--defense",
        "none",
        "--quiet",
    ]
    assert main([*train, "--out", str(tmp_path / "plain")]) == 0
    assert main([*train, "--replacement", "l2", "--replacement-param", "lam=0.01", "--out", str(tmp_path / "l2")]) == 0
    plan = tmp_path / "compare.toml"
    plan.write_text(f"""
bundle = "{tmp_path / "plain"}"
[audit]
attacks = ["gap", "confidence", "shokri"]
shadow_epochs = 5
[[setting]]
label = "none"
[[setting]]
label = "L2 0.01"
bundle = "{tmp_path / "l2"}"
[[setting]]
label = "none, marginal attacker data"
audit = {{ attacker_data = "marginal", attacks = ["shokri"] }}
[[setting]]
label = "none, model-based attacker data"
audit = {{ attacker_data = "model", attacker_data_params = {{ max_queries = 3000 }}, attacks = ["shokri"] }}
""")
    assert main(["sweep", "--plan", str(plan), "--quiet", "--out", str(tmp_path / "c")]) == 0
    rows = {r["setting"]: r for r in _sweep_rows(tmp_path / "c")}
    assert rows["L2 0.01"]["replacement"] == "l2" and rows["none"]["replacement"] == "none"
    marginal = rows["none, marginal attacker data"]["attacker_data"]
    assert marginal["queries_to_target"] == marginal["records_in"] + marginal["records_out"] > 0  # one per record
    model_based = rows["none, model-based attacker data"]["attacker_data"]
    assert 0 < model_based["queries_to_target"] <= 3000 and model_based["records_in"] > 0
    assert set(rows["none, marginal attacker data"]["attacks"]) == {"shadow/shokri"}
    assert "| [L2 0.01](L2_0.01/report.md) |" in (tmp_path / "c" / "sweep.md").read_text()


def test_selena_shards_fill_one_cache_then_a_full_run_distills(tabular: Path, tmp_path: Path, quick: None) -> None:
    """shard=i/N trains only that shard's sub-models (and exports nothing); the run without shard reuses them."""
    from defense_models.__main__ import main

    cache = tmp_path / "cache"
    args = ["train", "--dataset", "tabular", "--data", str(tabular), "--preset", "demo", "--defense", "none",
            "--quiet", "--replacement", "selena", "--replacement-param", "K=4", "--replacement-param", "L=2",
            "--replacement-param", f"cache={cache}", "--out", str(tmp_path / "b")]  # fmt: skip
    assert main([*args, "--replacement-param", "shard=1/2"]) == 0
    assert sorted(p.name for p in cache.glob("*.safetensors")) == ["selena_001.safetensors", "selena_003.safetensors"]
    assert not (tmp_path / "b" / "manifest.json").exists()
    assert main([*args, "--replacement-param", "shard=0/2"]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(stamps) == 4
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == stamps  # reused, not retrained
    assert load_bundle(tmp_path / "b").manifest.training.replacement["kind"] == "selena"  # type: ignore[union-attr]


def test_selena_distilled_on_the_reference_set_measures_test_on_rows_it_never_saw(
    tabular: Path, tmp_path: Path, quick: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """distill_on=both adds target_test to the distillation set: test accuracy (and the defenders' non-members)
    move to the validation role; the sub-models of the cache are reused."""
    from defense_models.__main__ import main
    from defense_models.audit.predictors import RawOnnxPredictor
    from defense_models.training.data import load_dataset

    args = ["train", "--dataset", "tabular", "--data", str(tabular), "--preset", "demo", "--defense", "none",
            "--quiet", "--replacement", "selena", "--replacement-param", "K=4", "--replacement-param", "L=2",
            "--replacement-param", f"cache={tmp_path / 'cache'}", "--out", str(tmp_path / "b")]  # fmt: skip
    assert main([*args, "--replacement-param", "distill_on=both"]) == 0
    training = load_bundle(tmp_path / "b").manifest.training
    assert training is not None and training.accuracy.test_role == "validation"
    split = np.load(tmp_path / "b" / "split.npz")
    rep = training.replacement
    assert rep["distill_on"] == "both" and rep["trained_on_reference"] is True
    assert rep["distill_rows"] == len(split["target_train"]) + len(split["target_test"])
    data = load_dataset("tabular", tabular)
    val = split["validation"]
    predicted = RawOnnxPredictor(tmp_path / "b").predict(data.X[val]).argmax(1)
    assert training.accuracy.test == pytest.approx(float((predicted == data.y[val]).mean()), abs=1e-6)
    assert main(args) == 0  # the paper's distillation: test on target_test, as every other bundle
    assert load_bundle(tmp_path / "b").manifest.training.accuracy.test_role == "target_test"  # type: ignore[union-attr]
    assert main([*args, "--replacement-param", "distill_on=everything"]) == 2
    assert "distill_on must be one of" in capsys.readouterr().err
