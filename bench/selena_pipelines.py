"""How accurate are `relabel_by`'s fold pipelines, and what would the plain recipe reach on the same rows?

`--replacement selena --replacement-param relabel_folds=F relabel_by=selena|selena_reference` labels each
member with a whole SELENA trained without its fold (docs/ALGORITHMS.md §8). A label is only as good as the
pipeline behind it, so this benchmark reads each fold pipeline's accuracy on its own members, on the fold it
never saw, and on the validation rows, from a target's sub-model cache (sub-models missing there are trained
first: run the plan's ``prepare`` before this). Beside them, the plain recipe trained on hard labels, on the
members alone and on the members plus the reference rows: what the data allows without SELENA.

    python bench/selena_pipelines.py \\
        --pipelines selena=artifacts/location30-selena-heldout-sub \\
        --pipelines selena_reference=artifacts/location30-selena-heldref-sub

Prints a table (one row per fold pipeline, then the plain rows) and writes ``bench/results/selena_pipelines.json``.
Run it with ``OMP_NUM_THREADS=1``: thread count changes the trained weights a little.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from defense_models.training.loop import accuracy  # noqa: E402
from defense_models.training.recipes import TrainConfig, dataset_and_split, recipe  # noqa: E402
from defense_models.training.replacements import (  # noqa: E402
    Context,
    _fold_pipelines,
    _plain,
    _selena,
    _selena_params,
    replacement_context,
    role_rows,
)


def pipeline_rows(ctx: Context, relabel_by: str, cache: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per fold pipeline: accuracy on its own members, its held-out fold and the validation rows."""
    p = _selena_params(ctx, {**params, "relabel_by": relabel_by, "cache": cache})
    X, y = ctx.members
    rows = []
    for f, (fold, sub, sub_p) in enumerate(_fold_pipelines(ctx, p, X, y)):
        model, _ = _selena(sub, sub_p)
        rows.append({"pipeline": f"{relabel_by} fold {f}", "trained_rows": len(sub.members[1]),
                     "own": accuracy(model, *sub.members), "held_out_fold": accuracy(model, X[fold], y[fold]),
                     "validation": accuracy(model, *ctx.validation)})  # fmt: skip
    return rows


def plain_rows(ctx: Context) -> list[dict[str, Any]]:
    """The target recipe on hard labels: on the members, and on the members plus the reference rows."""
    both = (torch.cat([ctx.members[0], ctx.reference[0]]), torch.cat([ctx.members[1], ctx.reference[1]]))
    rows = []
    for name, data in (("plain, members", ctx.members), ("plain, members + reference", both)):
        torch.manual_seed(ctx.seed)  # as train_replacement seeds every replacement
        model = _plain(ctx, *data, ctx.fit_config, name)
        rows.append({"pipeline": name, "trained_rows": len(data[1]), "own": accuracy(model, *data),
                     "held_out_fold": None, "validation": accuracy(model, *ctx.validation)})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="location30")
    ap.add_argument("--pipelines", action="append", default=[], metavar="RELABEL_BY=CACHE",
                    help="a relabel_by value and the target's sub-model cache it was trained with")
    ap.add_argument("--folds", type=int, default=2, help="relabel_folds")
    ap.add_argument("--distill-epochs", type=int, default=200)
    ap.add_argument("--distill-on", default="both")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selena_pipelines.json")
    args = ap.parse_args()
    config = TrainConfig(dataset=args.dataset, progress=False)
    data, split = dataset_and_split(config)
    arch, fit_config = recipe(config, data)
    ctx = replacement_context(config, data, split, arch, fit_config, role_rows(data, split, "target_train"),
                              config.seed)  # fmt: skip
    params = {"relabel_folds": args.folds, "distill_epochs": args.distill_epochs, "distill_on": args.distill_on}
    print(f"{'model':<30} {'rows':>6} {'own':>6} {'held-out fold':>14} {'validation':>11}")
    rows: list[dict[str, Any]] = []
    for item in args.pipelines:
        relabel_by, cache = item.split("=", 1)
        rows += pipeline_rows(ctx, relabel_by, cache, params)
        print_rows(rows[-args.folds:])
    rows += plain_rows(ctx)
    print_rows(rows[-2:])
    write_record(args.out, "bench/selena_pipelines.py", params=params, rows=rows)
    return 0


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        fold = "—" if r["held_out_fold"] is None else f"{r['held_out_fold']:.3f}"
        print(f"{r['pipeline']:<30} {r['trained_rows']:>6} {r['own']:6.3f} {fold:>14} {r['validation']:11.3f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
