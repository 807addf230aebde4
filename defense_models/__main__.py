"""``python -m defense_models``: the offline job's CLI.

train --dataset location30 --out DIR [--preset demo|official] [--seed N]
info DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from defense_models.pipeline import TrainConfig, train_bundle

    defenses = ("memguard", "aeppt") if "all" in args.defense else tuple(d for d in args.defense if d != "none")
    config = TrainConfig(
        dataset=args.dataset,
        preset=args.preset,
        defenses=defenses,
        substitute_label=args.substitute_label,
        seed=args.seed,
        progress=not args.quiet,
    )
    start = time.perf_counter()
    summary = train_bundle(config, Path(args.out))
    elapsed = time.perf_counter() - start
    print(f"\nbundle written to {args.out}  ({elapsed:.1f} s)")
    for key, value in summary.items():
        print(f"  {key:<24} {value}")
    print(f"\nserve it with:  python -m gateway serve --artifacts {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from gateway.artifacts import load_bundle

    bundle = load_bundle(Path(args.bundle))
    print(json.dumps(bundle.manifest.model_dump(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="defense_models", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a target model and write a servable bundle")
    p.add_argument("--dataset", default="location30")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    p.add_argument(
        "--preset",
        choices=("demo", "official"),
        default="official",
        help="demo: small MLP in seconds; official: the published target recipe",
    )
    p.add_argument(
        "--defense",
        action="append",
        choices=("memguard", "aeppt", "none", "all"),
        default=None,
        help="defender's classifiers to train (repeatable; default: all)",
    )
    p.add_argument(
        "--substitute-label",
        choices=("argmax", "true"),
        default="argmax",
        help="label AEPPT's substitute learns with (default: argmax, what it sees when serving)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("info", help="verify a bundle and print its manifest")
    p.add_argument("bundle")
    p.set_defaults(func=_cmd_info)
    args = parser.parse_args(argv)
    if getattr(args, "defense", "-") is None:
        args.defense = ["all"]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
