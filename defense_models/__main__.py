"""``python -m defense_models``: the offline job's CLI.

train   --dataset location30 --out DIR [--defense memguard|aeppt|none] [--replacement advreg]
shadows --dataset location30 --count 64 --shard i/N --out DIR [--replacement selena]
export  --model model.onnx --members in.npz --nonmembers out.npz --out DIR
audit   --bundle DIR [--defense memguard --param epsilon=0.5] [--adaptive] [--label-only] --out REPORT
sweep   --bundle DIR --defense memguard --param epsilon --values 0.1 0.5 1.0 --out SWEEP  (or --plan FILE.toml)
info    DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import MISSING
from pathlib import Path
from typing import Any


def _defenses(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--defense (repeatable; default all) -> the defender's classifiers to train (None: all)."""
    chosen = args.defense or ["all"]
    return None if "all" in chosen else tuple(d for d in chosen if d != "none")


def _default(name: str) -> Any:
    """An ``AuditConfig`` field's default: the flags show the config's defaults, never a copy of them."""
    from defense_models.audit.config import AuditConfig

    f = AuditConfig.__dataclass_fields__[name]
    return f.default if f.default_factory is MISSING else f.default_factory()


def _recipe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset and recipe flags shared by train and shadows, as TrainConfig fields."""
    return {"dataset": args.dataset, "data_path": args.data, "split": args.split, "split_file": args.split_file,
            "preset": args.preset, "arch": args.arch, "epochs": args.epochs, "seed": args.seed,
            "progress": not args.quiet}  # fmt: skip


def _replacement_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The replacement flags shared by train and shadows, as TrainConfig fields."""
    from defense_models.training.adv_reg import AdvRegConfig

    advreg = AdvRegConfig(lam=args.advreg_lambda, k=args.advreg_k, epochs=args.advreg_epochs,
                          warmup_epochs=args.advreg_epochs // 2)  # fmt: skip
    return {"replacement": args.replacement, "replacement_params": _params(args.replacement_param), "advreg": advreg}


def _defender_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The defender's-step flags shared by train and export."""
    return {"defender_recipe": args.defender_recipe, "holdout": args.holdout,
            "allow_weak_defense": args.allow_weak_defense}  # fmt: skip


def _print_summary(out: str, summary: dict[str, Any], elapsed: float) -> None:
    print(f"\nbundle written to {out}  ({elapsed:.1f} s)")
    for key, value in summary.items():
        print(f"  {key:<24} {value}")
    print(f"\nserve it with:  python -m gateway serve --artifacts {out}")


def _cmd_train(args: argparse.Namespace) -> int:
    from defense_models.bundle.train import train_bundle
    from defense_models.training.recipes import TrainConfig

    config = TrainConfig(
        **_recipe_kwargs(args),
        **_replacement_kwargs(args),
        defenses=_defenses(args),
        substitute_label=args.substitute_label,
        **_defender_kwargs(args),
    )
    from defense_models.training.replacements import PartialWork

    start = time.perf_counter()
    try:
        summary = train_bundle(config, Path(args.out)).summary
    except PartialWork as done:  # a shard of a replacement's work (SELENA's sub-models): nothing to export yet
        print(done)
        return 0
    _print_summary(args.out, summary, time.perf_counter() - start)
    return 0


def _cmd_shadows(args: argparse.Namespace) -> int:
    from defense_models.training.recipes import TrainConfig, parse_shard
    from defense_models.training.shadows import ShadowSpec, train_shadows

    shard = parse_shard(args.shard)
    start = time.perf_counter()
    config = TrainConfig(**_recipe_kwargs(args), **_replacement_kwargs(args))
    done = train_shadows(config, ShadowSpec(count=args.count, keep=args.keep), Path(args.out), shard)
    kind = "" if config.replacement == "none" else f" ({config.replacement})"
    print(
        f"shard {shard[0]}/{shard[1]}: trained {len(done)} shadows{kind} {done} in "
        f"{time.perf_counter() - start:.1f} s into {args.out}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from defense_models.bundle.byo import export_user_model
    from defense_models.bundle.train import defender_config
    from defense_models.training.recipes import TrainConfig

    config = defender_config(TrainConfig(preset=args.preset, defenses=_defenses(args), seed=args.seed,
                                         progress=not args.quiet, **_defender_kwargs(args)))  # fmt: skip
    start = time.perf_counter()
    summary = export_user_model(Path(args.model), Path(args.members), Path(args.nonmembers), Path(args.out),
                                name=args.name, output_kind=args.output_kind, config=config)  # fmt: skip
    _print_summary(args.out, summary, time.perf_counter() - start)
    return 0


def _audit_config(args: argparse.Namespace, **overrides: Any) -> Any:
    from defense_models.audit.attacks.label_only import LABEL_ONLY_ATTACKS
    from defense_models.audit.config import VIEWS, AuditConfig

    views = VIEWS if args.adaptive else tuple(args.views)
    everything = tuple(LABEL_ONLY_ATTACKS.names())
    label_only = () if args.label_only is None else tuple(args.label_only) or everything  # bare flag: all
    return AuditConfig(
        bundle=Path(args.bundle), url=args.url, api_key=args.api_key, noise_secret=args.noise_secret,
        attacks=tuple(args.attacks), views=views, label_only=label_only,
        label_only_rows=args.label_only_rows, label_only_queries=args.label_only_queries,
        label_only_copies=args.label_only_copies, eval_rows=args.eval_rows,
        lira_shadows=Path(args.lira_shadows) if args.lira_shadows else None,
        round_decimals=args.round_decimals, repeats=args.repeats, shadow_epochs=args.shadow_epochs, seed=args.seed,
        metrics_probe_rows=args.metrics_probe, timing_probe_rows=args.timing_probe,
        timing_probe_repeats=args.timing_probe_repeats, timing_probe_copies=args.timing_probe_copies,
        attacker_data=args.attacker_data, attacker_data_params=_params(args.attacker_data_param),
        dataset=args.dataset, data_path=Path(args.data) if args.data else None,
        split_file=Path(args.split_file) if args.split_file else None, shadow_arch=args.shadow_arch,
        progress=not args.quiet, **overrides,
    )  # fmt: skip


def _params(pairs: list[str]) -> dict[str, Any]:
    from defense_models.audit.sweep import parse_value

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param expects KEY=VALUE, got {pair!r}")
        out[key] = parse_value(value)
    return out


def _cmd_audit(args: argparse.Namespace) -> int:
    from defense_models.audit.report import write_report
    from defense_models.audit.run import run_audit

    result = run_audit(_audit_config(args, defense=args.defense_name, defense_params=_params(args.param)))
    write_report(result, Path(args.out), plots=not args.no_plots)
    print((Path(args.out) / "report.md").read_text())
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from defense_models.audit.sweep import audit_config, grid, load_plan, run_sweep
    from defense_models.training.recipes import parse_shard

    overrides: dict[str, Any] = {}
    if args.plan:
        bundle, overrides, settings = load_plan(Path(args.plan))
        args.bundle = args.bundle or str(bundle)
    elif args.bundle and args.defense_name and args.sweep_param and args.values:
        settings = grid(args.defense_name, args.sweep_param, args.values)
    else:
        raise SystemExit("sweep needs --plan FILE, or --bundle, --defense, --param and --values")
    if unknown := set(args.setting or ()) - {s.label for s in settings}:
        labels = [s.label for s in settings]
        raise SystemExit(f"--setting: no setting labelled {sorted(unknown)}; the plan has {labels}")
    base = audit_config(_audit_config(args), overrides)  # the plan's [audit] table wins over the flags' defaults
    only = frozenset(args.setting) if args.setting else None
    shard = parse_shard(args.shard)
    if run_sweep(Path(args.bundle), settings, Path(args.out), base, resume=args.resume, shard=shard, only=only):
        print((Path(args.out) / "sweep.md").read_text())
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
    from defense_models.training.data import available_datasets

    p.add_argument("--dataset", default="location30", choices=available_datasets(),
                   help="the dataset (location30 ships with the package; the others read --data)")  # fmt: skip
    p.add_argument("--data", help="path to the dataset's files (all but location30)")
    p.add_argument("--split", choices=("memguard", "random"), help="default: memguard for location30, else random")
    p.add_argument("--split-file", help=".npz of role -> row indices instead of a named split (e.g. a user model's "
                   "audit records, so shadows trains LiRA's references over them)")  # fmt: skip
    p.add_argument("--arch", help="override the recipe's architecture (location-mlp, purchase-mlp, small-mlp, cnn)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    _add_common(p)


def _add_defense(p: argparse.ArgumentParser) -> None:
    from defense_models.bundle.defender_step import DEFENDERS
    from defense_models.training.defenders import DEFENDER_RECIPES

    p.add_argument("--defense", action="append", choices=(*DEFENDERS.names(), "none", "all"), default=None,
                   help="defender's classifiers to train (repeatable; default: all)")  # fmt: skip
    p.add_argument("--defender-recipe", choices=sorted(DEFENDER_RECIPES),
                   help="how the defender's classifiers train (default: quick with --preset demo, else robust; "
                   "official: the papers' recipes)")  # fmt: skip
    p.add_argument("--holdout", type=float, default=0.25,
                   help="share of member and of non-member rows kept for the quality gate and self-audit")  # fmt: skip
    p.add_argument(
        "--allow-weak-defense",
        action="store_true",
        help="write the bundle even if a defense fails the quality gate (the manifest records it)",
    )


def _add_audit(p: argparse.ArgumentParser) -> None:
    from defense_models.audit.attacker_data import SOURCES
    from defense_models.audit.attacks import available_attacks
    from defense_models.audit.attacks.label_only import LABEL_ONLY_ATTACKS
    from defense_models.audit.config import VIEWS
    from defense_models.training.data import available_datasets

    d = _default
    p.add_argument("--url", help="audit a running gateway at this URL instead")
    p.add_argument("--api-key", help="bearer key for --url")
    p.add_argument("--noise-secret", help="in-process: the secret for randomized defenses (default: demo mode)")
    p.add_argument("--attacks", nargs="+", default=list(d("attacks")), choices=available_attacks(),
                   help="vector attacks")  # fmt: skip
    p.add_argument("--views", nargs="+", default=list(d("views")), choices=VIEWS,
                   help="attacker knowledge for vector attacks (all but shadow and known need a defense)")  # fmt: skip
    p.add_argument("--adaptive", action="store_true", help="all views: " + ", ".join(VIEWS))
    p.add_argument("--label-only", nargs="*", default=None, choices=LABEL_ONLY_ATTACKS.names(),
                   help="label-only attacks that query the target (no names: all)")  # fmt: skip
    p.add_argument("--label-only-rows", type=int, default=d("label_only_rows"),
                   help="members (and non-members) they query")  # fmt: skip
    p.add_argument("--label-only-queries", type=int, default=d("label_only_queries"),
                   help="boundary distance: queries per row at most")  # fmt: skip
    p.add_argument("--label-only-copies", type=int, default=d("label_only_copies"),
                   help="noise robustness: copies per row (paper: 100)")  # fmt: skip
    p.add_argument("--lira-shadows", help="reference models from `shadows` (runs LiRA online and offline)")
    p.add_argument("--eval-rows", type=int, default=d("eval_rows"), metavar="N",
                   help="audit a seeded sample of N evaluation members and N non-members (default: all)")
    p.add_argument("--round-decimals", type=int, default=d("round_decimals"), help="view rounded: decimals")
    p.add_argument("--repeats", type=int, default=d("repeats"), help="view repeated: queries averaged per record")
    p.add_argument("--metrics-probe", type=int, default=d("metrics_probe_rows"), metavar="ROWS",
                   help="the scraper attacker: ROWS members and non-members, /metrics read around each query")
    p.add_argument("--timing-probe", type=int, default=d("timing_probe_rows"), metavar="ROWS",
                   help="the timing attacker: ROWS members and non-members, each single-row query timed")
    p.add_argument("--timing-probe-repeats", type=int, default=d("timing_probe_repeats"), metavar="K",
                   help="the timing attacker: queries per row (scored on the fastest)")
    p.add_argument("--timing-probe-copies", type=int, default=d("timing_probe_copies"), metavar="K",
                   help="the timing attacker: copies of the row in each query (amplifies its work)")
    p.add_argument("--shadow-epochs", type=int, help="override the target recipe's epochs for the shadow model")
    p.add_argument("--attacker-data", default=d("attacker_data"), choices=SOURCES.names(),
                   help="the shadow model's training data (Shokri et al.): real records, noisy copies, "
                   "marginal-based or model-based synthesis (queries the target)")  # fmt: skip
    p.add_argument("--attacker-data-param", action="append", default=[], metavar="KEY=VALUE",
                   help="noisy: flip=0.2; marginal/model: max_queries=N")  # fmt: skip
    p.add_argument("--dataset", choices=available_datasets(),
                   help="with --split-file: the dataset its indices point into (a user's bundle)")  # fmt: skip
    p.add_argument("--data", help="with --dataset: its files (all but location30)")
    p.add_argument("--split-file", help=".npz with index arrays target_train (evaluation members), eval_nonmember, "
                   "shadow_in, shadow_out: the records to audit a bundle that records no split")  # fmt: skip
    p.add_argument("--shadow-arch", help="the attacker's shadow architecture where the bundle records none")
    p.add_argument("--seed", type=int, default=d("seed"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every choice list comes from a registry, every audit default from ``AuditConfig``."""
    parser = argparse.ArgumentParser(
        prog="defense_models", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _shadows_parser, _export_parser, _audit_parser, _sweep_parser, _info_parser):
        add(sub)
    return parser


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a target model and write a servable bundle")
    _add_recipe(p)
    _add_defense(p)
    p.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    _add_replacement(p, "serve a training-time defense's model instead (defense_models/training/replacements.py)")
    p.add_argument("--substitute-label", choices=("argmax", "true"), default="argmax",
                   help="label AEPPT's substitute learns with (default: argmax, as when serving)")  # fmt: skip
    p.set_defaults(func=_cmd_train)


def _add_replacement(p: argparse.ArgumentParser, help_text: str) -> None:
    from defense_models.training.replacements import REPLACEMENTS

    p.add_argument("--replacement", choices=("none", *REPLACEMENTS.names()), default="none", help=help_text)
    p.add_argument("--replacement-param", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. l2: lam=1e-3; dropout: p=0.5; dpsgd: epsilon=8 delta=1e-5 epochs=30 lr=1e-3")  # fmt: skip
    p.add_argument("--advreg-lambda", type=float, default=3.0, help="λ of adversarial regularization")
    p.add_argument("--advreg-k", type=int, default=2, help="inference-model steps per classifier step")
    p.add_argument("--advreg-epochs", type=int, default=80, help="epochs, the first half plain (warm-up)")


def _shadows_parser(sub: Any) -> None:
    p = sub.add_parser("shadows", help="train shadow/reference models by index (scale out with --shard i/N)")
    _add_recipe(p)
    p.add_argument("--count", type=int, default=16, help="total number of shadows across all shards")
    p.add_argument("--keep", type=float, default=0.5, help="share of the pool each shadow trains on")
    p.add_argument("--shard", default="0/1", help="i/N: train the shadows j with j %% N == i")
    p.add_argument("--out", required=True, help="directory shared by all shards")
    _add_replacement(p, "each shadow is this training-time defense, as `train --replacement` trains it (LiRA's "
                        "references then copy the defense)")  # fmt: skip
    p.set_defaults(func=_cmd_shadows)


def _export_parser(sub: Any) -> None:
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


def _audit_parser(sub: Any) -> None:
    from gateway.defenses import available_defenses

    p = sub.add_parser("audit", help="attack a bundle (in-process gateway) or a live endpoint (--url)")
    p.add_argument("--bundle", required=True, help="the bundle (its split and dataset define the sets)")
    p.add_argument("--defense", dest="defense_name", default="none", choices=available_defenses(),
                   help="defense of the in-process gateway (and of the adaptive attacker's copy)")  # fmt: skip
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="defense parameter, repeatable (e.g. epsilon=0.5, decimals=2, step_size=1e-4)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _add_audit(p)
    p.add_argument("--out", required=True, help="directory for report.md, report.json, scores.npz and plots")
    p.set_defaults(func=_cmd_audit)


def _sweep_parser(sub: Any) -> None:
    from gateway.defenses import available_defenses

    p = sub.add_parser("sweep", help="audit many settings: accuracy-vs-budget curves and comparison tables")
    p.add_argument("--plan", help="TOML plan: bundle, [audit] options and [[setting]] entries")
    p.add_argument("--bundle", help="bundle (a plan's own bundle otherwise)")
    p.add_argument("--defense", dest="defense_name", choices=available_defenses(),
                   help="with --param/--values: the defense to sweep")  # fmt: skip
    p.add_argument("--param", dest="sweep_param", help="the parameter to sweep (e.g. epsilon, step_size)")
    p.add_argument("--values", nargs="+", help="its values")
    p.add_argument("--resume", action="store_true", help="read back settings already audited in --out")
    p.add_argument("--shard", default="0/1", help="i/N: audit only the settings k with k %% N == i (parts run side "
                   "by side into one --out; the table is written once every setting has a report)")  # fmt: skip
    p.add_argument("--setting", action="append", metavar="LABEL", help="audit only this setting (repeatable)")
    _add_audit(p)
    p.add_argument("--out", required=True, help="directory for sweep.md, sweep.json, sweep.png and each report")
    p.set_defaults(func=_cmd_sweep)


def _info_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="verify a bundle and print its manifest")
    p.add_argument("bundle")
    p.set_defaults(func=_cmd_info)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from defense_models.bundle.quality import WeakDefenseError
    from gateway.registry import ParameterError

    try:
        return int(args.func(args))
    except ParameterError as exc:  # a bad name or --replacement-param/--param: the user's input, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WeakDefenseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
