"""``python -m defense_models``: the offline job's CLI.

train   --dataset location30 --out DIR [--defense memguard|aeppt|none] [--replacement advreg]
shadows --dataset location30 --count 64 --shard i/N --out DIR
export  --model model.onnx --members in.npz --nonmembers out.npz --out DIR
info    DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _defenses(args: argparse.Namespace) -> tuple[str, ...]:
    """--defense (repeatable; default all) -> the defender's classifiers to train."""
    chosen = args.defense or ["all"]
    return ("memguard", "aeppt") if "all" in chosen else tuple(d for d in chosen if d != "none")


def _recipe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset and recipe flags shared by train and shadows, as TrainConfig fields."""
    return {"dataset": args.dataset, "data_path": args.data, "split": args.split, "preset": args.preset,
            "arch": args.arch, "epochs": args.epochs, "seed": args.seed, "progress": not args.quiet}  # fmt: skip


def _print_summary(out: str, summary: dict[str, Any], elapsed: float) -> None:
    print(f"\nbundle written to {out}  ({elapsed:.1f} s)")
    for key, value in summary.items():
        print(f"  {key:<24} {value}")
    print(f"\nserve it with:  python -m gateway serve --artifacts {out}")


def _cmd_train(args: argparse.Namespace) -> int:
    from defense_models.pipeline import TrainConfig, train_bundle
    from defense_models.training.adv_reg import AdvRegConfig

    config = TrainConfig(
        **_recipe_kwargs(args),
        defenses=_defenses(args),
        replacement=args.replacement,
        advreg=AdvRegConfig(
            lam=args.advreg_lambda, k=args.advreg_k, epochs=args.advreg_epochs, warmup_epochs=args.advreg_epochs // 2
        ),
        substitute_label=args.substitute_label,
    )
    start = time.perf_counter()
    summary = train_bundle(config, Path(args.out)).summary
    _print_summary(args.out, summary, time.perf_counter() - start)
    return 0


def _cmd_shadows(args: argparse.Namespace) -> int:
    from defense_models.pipeline import TrainConfig
    from defense_models.shadows import ShadowSpec, parse_shard, train_shadows

    shard = parse_shard(args.shard)
    start = time.perf_counter()
    done = train_shadows(
        TrainConfig(**_recipe_kwargs(args)), ShadowSpec(count=args.count, keep=args.keep), Path(args.out), shard
    )
    print(
        f"shard {shard[0]}/{shard[1]}: trained {len(done)} shadows {done} in {time.perf_counter() - start:.1f} s "
        f"into {args.out}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from defense_models.byo import export_user_model
    from defense_models.pipeline import TrainConfig

    config = TrainConfig(preset=args.preset, defenses=_defenses(args), seed=args.seed, progress=not args.quiet)
    start = time.perf_counter()
    summary = export_user_model(Path(args.model), Path(args.members), Path(args.nonmembers), Path(args.out),
                                name=args.name, output_kind=args.output_kind, config=config)  # fmt: skip
    _print_summary(args.out, summary, time.perf_counter() - start)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from defense_models.audit import AuditConfig, run_audit, write_report

    config = AuditConfig(
        bundle=Path(args.bundle), defense=args.defense_name, url=args.url, api_key=args.api_key,
        noise_secret=args.noise_secret, attacks=tuple(args.attacks), adaptive=args.adaptive,
        shadow_epochs=args.shadow_epochs, label_only=args.label_only, label_only_copies=args.label_only_copies,
        seed=args.seed,
    )  # fmt: skip
    report = run_audit(config)
    write_report(report, Path(args.out))
    print((Path(args.out) / "report.md").read_text())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from gateway.artifacts import load_bundle

    bundle = load_bundle(Path(args.bundle))
    print(json.dumps(bundle.manifest.model_dump(), indent=2))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("demo", "official"), default="official",
                   help="demo: small, fast recipes; official: the published ones")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="location30",
                   help="location30 (bundled), purchase100, texas100, cifar10, cifar100, idx, tabular")  # fmt: skip
    p.add_argument("--data", help="path to the dataset's files (all but location30)")
    p.add_argument("--split", choices=("memguard", "random"), help="default: memguard for location30, else random")
    p.add_argument("--arch", help="override the recipe's architecture (location-mlp, purchase-mlp, small-mlp, cnn)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    _add_common(p)


def _add_defense(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defense", action="append", choices=("memguard", "aeppt", "none", "all"), default=None,
                   help="defender's classifiers to train (repeatable; default: all)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="defense_models", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a target model and write a servable bundle")
    _add_recipe(p)
    _add_defense(p)
    p.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    p.add_argument("--replacement", choices=("none", "advreg"), default="none",
                   help="advreg: serve an adversarially-regularized replacement (Nasr et al.)")  # fmt: skip
    p.add_argument("--advreg-lambda", type=float, default=3.0, help="λ of adversarial regularization")
    p.add_argument("--advreg-k", type=int, default=2, help="inference-model steps per classifier step")
    p.add_argument("--advreg-epochs", type=int, default=80, help="epochs, the first half plain (warm-up)")
    p.add_argument("--substitute-label", choices=("argmax", "true"), default="argmax",
                   help="label AEPPT's substitute learns with (default: argmax, as when serving)")  # fmt: skip
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("shadows", help="train shadow/reference models by index (scale out with --shard i/N)")
    _add_recipe(p)
    p.add_argument("--count", type=int, default=16, help="total number of shadows across all shards")
    p.add_argument("--keep", type=float, default=0.5, help="share of the pool each shadow trains on")
    p.add_argument("--shard", default="0/1", help="i/N: train the shadows j with j %% N == i")
    p.add_argument("--out", required=True, help="directory shared by all shards")
    p.set_defaults(func=_cmd_shadows)

    p = sub.add_parser("export", help="bundle your own ONNX target: trains the defender's classifiers on its outputs")
    p.add_argument("--model", required=True, help="ONNX file with one input [B, D] and a dynamic batch axis")
    p.add_argument("--members", required=True, help=".npz (X[, y]) or .npy of rows the model was trained on")
    p.add_argument("--nonmembers", required=True, help=".npz (X[, y]) or .npy of rows it never saw")
    p.add_argument("--output-kind", choices=("logits", "probabilities"), default="logits")
    p.add_argument("--name", default="model")
    p.add_argument("--out", required=True)
    _add_common(p)
    _add_defense(p)
    p.set_defaults(func=_cmd_export)

    from defense_models.audit import DEFAULT_ATTACKS

    p = sub.add_parser("audit", help="attack a bundle (in-process gateway) or a live endpoint (--url)")
    p.add_argument("--bundle", required=True, help="the bundle (its split and dataset define the sets)")
    p.add_argument("--defense", dest="defense_name", default="none", help="defense of the in-process gateway")
    p.add_argument("--url", help="audit a running gateway at this URL instead")
    p.add_argument("--api-key", help="bearer key for --url")
    p.add_argument("--noise-secret", help="in-process: the secret for randomized defenses (default: demo mode)")
    p.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS))
    p.add_argument("--adaptive", action="store_true", help="defend the shadow outputs too (defense-aware attacker)")
    p.add_argument("--shadow-epochs", type=int, help="override the target recipe's epochs for the shadow model")
    p.add_argument(
        "--label-only",
        action="store_true",
        help="also run the label-only noise-robustness attack (binary features; queries the target)",
    )
    p.add_argument("--label-only-copies", type=int, default=20, help="perturbed copies per row (paper: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for report.json and report.md")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("info", help="verify a bundle and print its manifest")
    p.add_argument("bundle")
    p.set_defaults(func=_cmd_info)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
