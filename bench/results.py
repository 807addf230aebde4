"""Regenerate the results the docs show (``make results``).

For every plan under ``bench/plans/``: run its ``prepare`` commands whose output is missing (``shadows``
always runs: it skips the shadows already trained), run the sweep into ``reports/<plan>`` with ``--resume``
(settings already audited are read back), and copy what the docs show into ``docs/results/<plan>``: the
Markdown tables (``sweep.md``, every ``report.md``), ``sweep.png``, and the report plots of the settings in
``PLOTS_SHOWN``. ``reports/`` stays out of git.

    python bench/results.py [--plan location30] [--dry-run]

Hours on two cores for all plans; a plan that fails stops the run with its command.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._data import ensure_fashion_mnist  # noqa: E402

PLANS = ROOT / "bench" / "plans"
#: plan -> settings (report directories) whose plots docs/RESULTS.md shows
PLOTS_SHOWN = {"location30": ("none", "MemGuard_eps=1.0")}


def _run(argv: list[str], dry_run: bool) -> None:
    print("$", " ".join(shlex.quote(a) for a in argv), flush=True)
    if not dry_run:
        subprocess.run(argv, cwd=ROOT, check=True)


def _prepare(command: str, dry_run: bool) -> None:
    args = shlex.split(command)
    if "fashion_mnist" in args and "--data" not in args and not dry_run:
        ensure_fashion_mnist()
    out = ROOT / args[args.index("--out") + 1]
    if args[0] == "train" and (out / "manifest.json").exists():
        print(f"  {out.relative_to(ROOT)} exists", flush=True)
        return
    _run([sys.executable, "-m", "defense_models", *args, "--quiet"], dry_run)


def _publish(report_dir: Path, docs_dir: Path, plan: str) -> None:
    docs_dir.mkdir(parents=True, exist_ok=True)
    for md in report_dir.rglob("*.md"):
        target = docs_dir / md.relative_to(report_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(md, target)
    shutil.copy2(report_dir / "sweep.png", docs_dir / "sweep.png")
    for setting in PLOTS_SHOWN.get(plan, ()):
        for png in (report_dir / setting).glob("*.png"):
            shutil.copy2(png, docs_dir / setting / png.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="append", help="plan names (file stems with - for _); default: all")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args()
    for path in sorted(PLANS.glob("*.toml")):
        name = path.stem.replace("_", "-")
        if args.plan and name not in args.plan:
            continue
        print(f"== {name}", flush=True)
        for command in tomllib.loads(path.read_text()).get("prepare", []):
            _prepare(command, args.dry_run)
        report_dir = ROOT / "reports" / name
        _run([sys.executable, "-m", "defense_models", "sweep", "--plan", str(path.relative_to(ROOT)), "--resume",
              "--quiet", "--out", str(report_dir.relative_to(ROOT))], args.dry_run)  # fmt: skip
        if not args.dry_run:
            _publish(report_dir, ROOT / "docs" / "results" / name, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
