"""Wall time of the fit loop on Fashion-MNIST's CNN recipe, per epoch, in both memory layouts, side by side.

Issue 15's Fashion-MNIST plan trains ~100 CNNs (targets, replacements, LiRA references), so an epoch's cost
decides whether it fits a machine. This trains the recipe's CNN (``train --dataset fashion_mnist``: 10,000
member images, batch 128, Adam 1e-3) for ``--epochs`` epochs with ``channels_last`` off and on, alternating,
``--rounds`` times, and prints seconds per epoch and the training accuracy reached. Installs the Debian
package ``dataset-fashion-mnist`` if missing. Results go to bench/results/fit_speed.json.

    python bench/fit_speed.py [--epochs 2] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._data import ensure_fashion_mnist  # noqa: E402
from bench._record import write_record  # noqa: E402
from defense_models.training.data import load_dataset, make_split  # noqa: E402
from defense_models.training.loop import accuracy, fit  # noqa: E402
from defense_models.training.nets import ARCHITECTURES  # noqa: E402
from defense_models.training.recipes import RECIPES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fit_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_fashion_mnist()
    data = load_dataset("fashion_mnist")
    members = make_split(data, None, seed=0).parts["target_train"]
    X, y = torch.from_numpy(data.X[members]), torch.from_numpy(data.y[members]).long()
    arch, recipe = RECIPES[("fashion_mnist", "official")]
    print(f"Fashion-MNIST CNN, {len(members)} images, batch {recipe.batch_size}, {args.epochs} epochs a run, "
          f"{args.threads} torch threads")  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"contiguous": [], "channels_last": []}
    for _ in range(args.rounds):
        for layout in runs:
            config = dataclasses.replace(recipe, epochs=args.epochs, channels_last=layout == "channels_last")
            model = ARCHITECTURES[arch](data)
            t0 = time.perf_counter()
            fit(model, X, y, config)
            per_epoch = (time.perf_counter() - t0) / args.epochs
            acc = accuracy(model, X, y)
            runs[layout].append({"s_per_epoch": round(per_epoch, 2), "train_accuracy": round(acc, 4)})
            print(f"  {layout:<14} {per_epoch:6.1f} s per epoch   train accuracy {acc:.3f}", flush=True)
    best = {k: min(r["s_per_epoch"] for r in v) for k, v in runs.items()}
    print(f"\n  channels_last / contiguous: {best['contiguous'] / best['channels_last']:.2f}x faster (best runs)")
    write_record(args.out, "bench/fit_speed.py", threads=args.threads, epochs=args.epochs, runs=runs, best=best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
