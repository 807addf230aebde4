"""Where adversarial regularization can land on Location30: the accuracy/gap frontier of every recipe.

The goal for a replacement model is test accuracy within 3 points of the plain target while the
train–test gap at least halves. This benchmark asks whether *any* point on the learning curves of
the plain target (early stopping), L2, logistic regression, and adversarial regularization (the
pipeline's advreg at several λ) reaches that region. Every epoch of every run is a candidate
checkpoint, i.e. the most generous possible checkpoint selection.

Test accuracy is measured on the evaluation non-members (idx[2000:3000]), which no method trains on:
advreg uses the target-test records (idx[1000:2000]) as its reference set D′.

    python bench/advreg_frontier.py [--lams 0.5 1 3] [--dataset purchase100 --data-path FILE] [--out ...]

Prints a table (per method: the best test accuracy among checkpoints with at most half the plain
gap) and writes every (method, epoch, train, test) point plus ``advreg_frontier.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from defense_models.training.adv_reg import train_adv_reg  # noqa: E402
from defense_models.training.loop import accuracy, fit  # noqa: E402
from defense_models.training.nets import build  # noqa: E402
from defense_models.training.recipes import TrainConfig, dataset_and_split, recipe  # noqa: E402
from defense_models.training.replacements import Context, advreg_setup  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.5, 1.0, 3.0], help="advreg λ values")
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2], help="L2 λ values (λ‖w‖²)")
    ap.add_argument("--dataset", default="location30", help="any dataset of `defense_models` (e.g. purchase100)")
    ap.add_argument("--data-path", default=None, help="the dataset's file, for datasets not bundled")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "advreg_frontier.json")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    config = TrainConfig(dataset=args.dataset, data_path=args.data_path, progress=False)
    data, split = dataset_and_split(config)
    arch, target_fit = recipe(config, data)

    def tensors(role: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = split.parts[role]
        return torch.from_numpy(data.X[idx]), torch.from_numpy(data.y[idx])

    members, reference, test = tensors("target_train"), tensors("target_test"), tensors("eval_nonmember")
    points: list[dict[str, Any]] = []

    def recorder(method: str, every: int = 1, start: int = 0) -> Any:
        def on_epoch(epoch: int, model: nn.Module) -> None:
            if epoch >= start and (epoch + 1) % every == 0:
                points.append({"method": method, "epoch": epoch + 1, "train": accuracy(model, *members),
                               "test": accuracy(model, *test)})  # fmt: skip

        return on_epoch

    def run_fit(method: str, model: nn.Module, fit_config: Any, every: int) -> None:
        fit(model, *members, fit_config, on_epoch=recorder(method, every))
        print(f"  {method}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    torch.manual_seed(config.seed)
    run_fit("plain (early stopping)", build(arch, data), target_fit, 5)
    for lam in args.l2:
        torch.manual_seed(config.seed)
        run_fit(f"L2 λ={lam:g}", build(arch, data), replace(target_fit, weight_decay=2 * lam), 10)
    for wd in (1e-2, 3e-2):
        torch.manual_seed(config.seed)
        linear = nn.Linear(data.width, data.classes)
        run_fit(f"logistic regression, L2 {wd:g}", linear, replace(target_fit, optimizer="adam", lr=1e-2,
                                                                   epochs=60, weight_decay=wd), 5)  # fmt: skip
    ctx = Context(data, arch, target_fit, members, reference, tensors("validation"), config.seed, False,
                  config.advreg, config.advreg_follow_recipe)  # fmt: skip
    for lam in args.lams:
        adv, ref = advreg_setup(ctx, {"lam": lam})
        torch.manual_seed(config.seed)
        model = build(arch, data)
        train_adv_reg(model, members, ref, ctx.validation, data.classes, adv,
                      on_epoch=recorder(f"advreg λ={lam:g}", 2, adv.warmup_epochs))  # fmt: skip
        print(f"  advreg λ={lam:g}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    plain = [q for q in points if q["method"].startswith("plain")][-1]  # the served target: last epoch
    plain_gap = plain["train"] - plain["test"]
    goal = {"max_gap": plain_gap / 2, "min_test": plain["test"] - 0.03}
    print(f"\nplain target: train {plain['train']:.3f}, test {plain['test']:.3f}, gap {plain_gap:.3f}")
    print(f"goal: gap <= {goal['max_gap']:.3f} and test >= {goal['min_test']:.3f}\n")
    header = f"{'method':<34} {'points':>6} {'best test, gap <= goal':>23} {'its train':>9} {'epoch':>6} {'goal':>5}"
    print(header)
    print("-" * len(header))
    summary = []
    for method in dict.fromkeys(q["method"] for q in points):
        mine = [q for q in points if q["method"] == method]
        ok = [q for q in mine if q["train"] - q["test"] <= goal["max_gap"]]
        best = max(ok, key=lambda q: q["test"]) if ok else None
        met = best is not None and best["test"] >= goal["min_test"]
        summary.append({"method": method, "points": len(mine), "best": best, "goal_met": met})
        cells = (
            f"{best['test']:>23.3f} {best['train']:>9.3f} {best['epoch']:>6}"
            if best
            else f"{'none':>23} {'':>9} {'':>6}"
        )
        print(f"{method:<34} {len(mine):>6} {cells} {'yes' if met else 'no':>5}")
    write_record(args.out, "bench/advreg_frontier.py", plain=plain, goal=goal, summary=summary, points=points,
                 seconds=round(time.perf_counter() - started, 1))  # fmt: skip
    if not args.no_plot:
        plot(points, plain, goal, args.out.with_suffix(".png"), data.name)
    return 0


def plot(points: list[dict[str, Any]], plain: dict[str, Any], goal: dict[str, float], out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for method in dict.fromkeys(q["method"] for q in points):
        mine = [q for q in points if q["method"] == method]
        ax.plot([q["train"] for q in mine], [q["test"] for q in mine], "o-", ms=3, lw=1, label=method)
    # the goal region: test ≥ plain − 3 points and train ≤ test + half the plain gap
    lo, top, g = goal["min_test"], 0.8, goal["max_gap"]
    ax.fill([0, lo + g, top + g, 0], [lo, lo, top, top], color="green", alpha=0.12,
            label="goal: test ≥ plain − 3 pts, gap ≤ half")  # fmt: skip
    ax.plot([plain["train"]], [plain["test"]], "k*", ms=12, label="plain target (served)")
    ax.set_xlabel("train accuracy (members)")
    ax.set_ylabel("test accuracy (evaluation non-members)")
    ax.set_title(f"{name}: every checkpoint of every recipe")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 0.8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"written to {out}")


if __name__ == "__main__":
    sys.exit(main())
