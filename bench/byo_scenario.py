"""A user's own model, built the way a user would: our pipeline never sees its training.

Writes, under ``--out``:

* ``target.onnx``: an MLP trained by the user's recipe (Adam, 30 epochs on Location30, 100 on
  Fashion-MNIST, no regularization: overfit), exported with a dynamic batch axis, output ``logits``;
* ``members.npz`` / ``nonmembers.npz``: what the user hands ``export`` (by default 1,500 of the
  target's training rows and 500 rows it never saw: an unbalanced defender's set);
* ``audit_split.npz``: the roles ``audit --split-file`` needs: evaluation members (training rows
  the defender never got), evaluation non-members, and the attacker's shadow pool, all disjoint
  from the defender's rows.

Datasets: ``location30`` (bundled) and ``fashion-mnist`` (Debian's ``dataset-fashion-mnist``,
installed when missing, read with the IDX loader).

    python bench/byo_scenario.py --dataset location30 --out /tmp/byo-loc
    python -m defense_models export --model /tmp/byo-loc/target.onnx --members /tmp/byo-loc/members.npz \
        --nonmembers /tmp/byo-loc/nonmembers.npz --name mine --out /tmp/byo-loc/bundle
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench._data import FASHION_DIR, ensure_fashion_mnist

#: The user's target per dataset: hidden widths, training rows, epochs. (Fashion-MNIST after 30 epochs on
#: 2,000 or 4,000 rows generalizes well enough, 0.97/0.82 and 0.95/0.83, that the export's gate finds no
#: membership signal to defend: trained to zero loss, it leaks.)
TARGETS = {"location30": ((512, 256), 2000, 30), "fashion-mnist": ((512, 256), 2000, 100)}


def load(name: str):  # -> defense_models.training.data.Dataset
    from defense_models.training.data import load_dataset

    if name == "location30":
        return load_dataset("location30")
    return load_dataset("idx", ensure_fashion_mnist())


def train_user_target(X: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], classes: int, seed: int,
                      epochs: int = 30) -> nn.Module:  # fmt: skip
    """The user's recipe: ReLU MLP, Adam 1e-3, batch 64, ``epochs`` epochs, nothing else."""
    torch.manual_seed(seed)
    dims = (X.shape[1], *hidden)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(dims[-1], classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xt[b]), yt[b]).backward()
            opt.step()
    return model.eval()


def onnx_bytes(model: nn.Module, width: int) -> bytes:
    buf = io.BytesIO()
    axes = {"x": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(model, (torch.zeros(2, width),), buf, input_names=["x"], output_names=["logits"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    return buf.getvalue()


def build_scenario(dataset: str, out: Path, *, members: int, nonmembers: int, seed: int) -> dict:
    data = load(dataset)
    hidden, n_train, epochs = TARGETS[dataset]
    perm = np.random.default_rng(seed).permutation(len(data.y))
    train, rest = perm[:n_train], perm[n_train:]
    defender_in, eval_in = train[:members], train[members:]
    defender_out, rest = rest[:nonmembers], rest[nonmembers:]
    n_eval = min(len(rest) // 3, 2 * len(eval_in))
    eval_out, pool = rest[:n_eval], rest[n_eval:]
    half = min(len(pool) // 2, n_train)  # the attacker's shadow trains on about as many rows as the target
    shadow_in, shadow_out = pool[:half], pool[half : 2 * half]
    model = train_user_target(data.X[train], data.y[train], hidden, data.classes, seed, epochs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "target.onnx").write_bytes(onnx_bytes(model, data.width))
    np.savez(out / "members.npz", X=data.X[defender_in], y=data.y[defender_in])
    np.savez(out / "nonmembers.npz", X=data.X[defender_out], y=data.y[defender_out])
    np.savez(out / "audit_split.npz", target_train=eval_in, eval_nonmember=eval_out, shadow_in=shadow_in,
             shadow_out=shadow_out)  # fmt: skip
    with torch.no_grad():
        p_train = torch.softmax(model(torch.from_numpy(data.X[train])), 1)
        p_test = torch.softmax(model(torch.from_numpy(data.X[eval_out])), 1)
    facts = {
        "dataset": dataset,
        "data_path": str(FASHION_DIR) if dataset == "fashion-mnist" else None,
        "loader": "idx" if dataset == "fashion-mnist" else "location30",
        "train_accuracy": float((p_train.argmax(1).numpy() == data.y[train]).mean()),
        "test_accuracy": float((p_test.argmax(1).numpy() == data.y[eval_out]).mean()),
        "members_top_above_0.999": float((p_train.max(1).values > 0.999).float().mean()),
        "rows": {
            "defender_members": members,
            "defender_nonmembers": nonmembers,
            "eval_members": len(eval_in),
            "eval_nonmembers": len(eval_out),
            "shadow_in": len(shadow_in),
            "shadow_out": len(shadow_out),
        },
    }
    (out / "scenario.json").write_text(json.dumps(facts, indent=2))
    return facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(TARGETS), default="location30")
    p.add_argument("--members", type=int, default=1500)
    p.add_argument("--nonmembers", type=int, default=500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    facts = build_scenario(args.dataset, args.out, members=args.members, nonmembers=args.nonmembers, seed=args.seed)
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
