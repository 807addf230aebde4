"""A user's own model end to end: build it, ``export`` it, serve it, audit it over HTTP.

For each dataset (``bench/byo_scenario.py`` builds the user's target and rows):

1. ``defense_models export`` with the default recipe (1,500 member and 500 non-member rows);
2. ``defense_models shadows --split-file`` trains LiRA's reference models over the audit records;
3. for each defense (none, MemGuard ε = 1, AEPPT as calibrated) a real gateway process on
   127.0.0.1 serves the bundle, and ``defense_models audit --url`` runs the full suite against it:
   every attacker view, both label-only attacks, LiRA online and offline;
4. one table: the best confidence-based attack per view next to the label-only floor, label loss,
   mean L1, and the export's self-audit beside the HTTP audit.

    python bench/byo_audit.py                       # both datasets (installs dataset-fashion-mnist if missing)
    python bench/byo_audit.py --datasets location30 --refs 8

Writes ``bench/results/byo_audit.json`` and ``docs/results/byo_audit.md``; the reports stay under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.byo_scenario import build_scenario  # noqa: E402

#: (defense, gateway parameters as environment variables)
DEFENSES = {"none": {}, "memguard": {"GATEWAY_MEMGUARD_EPSILON": "1.0"}, "aeppt": {}}
#: The attacker's shadow architecture per dataset (the user's recipe is unknown to it).
SHADOW_ARCH = {"location30": "location-mlp", "fashion-mnist": "small-mlp"}
SECRET = "byo-audit-bench-secret-0123456789abcdef"


def run(cmd: list[str], log: Path, **env: str) -> None:
    print("$", " ".join(cmd), flush=True)
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """``python -m gateway serve`` in its own process, until the block ends."""

    def __init__(self, bundle: Path, defense: str, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "gateway", "serve", "--artifacts", str(bundle), "--defense", defense,
               "--port", str(self.port)]  # fmt: skip
        self.log = log.open("a")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "GATEWAY_NOISE_SECRET": SECRET, **env})  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Gateway:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the gateway did not become ready in 120 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def audit(dataset: str, facts: dict, bundle: Path, defense: str, url: str, refs: Path, out: Path, log: Path) -> dict:
    data = ["--dataset", facts["loader"], *(["--data", facts["data_path"]] if facts["data_path"] else [])]
    cmd = [sys.executable, "-m", "defense_models", "audit", "--bundle", str(bundle), "--url", url,
           "--defense", defense, *data, "--split-file", str(bundle.parent / "audit_split.npz"),
           "--shadow-arch", SHADOW_ARCH[dataset], "--label-only", "--lira-shadows", str(refs),
           "--quiet", "--no-plots", "--out", str(out)]  # fmt: skip
    cmd += ["--adaptive"] if defense != "none" else ["--views", "shadow", "known"]
    run(cmd, log)
    return json.loads((out / "report.json").read_text())


def best(report: dict, view: str) -> dict | None:
    """The best confidence-based attack of one view (LiRA counts as its own view, 'reference')."""
    from defense_models.audit.run import CONFIDENCE_BASED

    keys = [k for k in report["attacks"] if k.split("/")[0] == view
            and (k.split("/")[-1] in CONFIDENCE_BASED or "lira" in k)]  # fmt: skip
    if not keys:
        return None
    k = max(keys, key=lambda k: report["attacks"][k]["balanced_accuracy"])
    a = report["attacks"][k]
    return {"attack": k, "balanced_accuracy": a["balanced_accuracy"], "tpr_at_01pct_fpr": a["tpr_at_01pct_fpr"]}


def summarize(
    dataset: str, defense: str, report: dict, self_audit: dict[str, dict], quality: dict | None = None
) -> dict:
    u = report["utility"]
    views = {v: best(report, v) for v in (*report["views"], "reference")}
    label_only = {k: report["attacks"][k]["balanced_accuracy"] for k in report["attacks"] if k.startswith("label-")}
    shadow_adaptive = [views[v]["balanced_accuracy"] for v in ("shadow", "adaptive") if views.get(v)]
    mine = self_audit.get(defense, {})
    gate = (quality or {}).get(defense) or {}
    return {
        "gate": "—" if not gate else ("refused" if gate.get("problems") else "passed"),
        "dataset": dataset, "defense": defense, "floor": u["label_only_floor"], "label_loss": u["label_loss"],
        "mean_l1": u["l1"]["mean"], "test_accuracy": u["test_accuracy"],
        "views": views, "label_only": label_only,
        "best_shadow_adaptive": max(shadow_adaptive),
        "goal_met": u["label_loss"] == 0 and max(shadow_adaptive) <= u["label_only_floor"] + 0.02,
        "self_audit": mine.get("balanced_accuracy"), "self_audit_upper": mine.get("upper_bound"),
        "self_audit_floor": mine.get("label_only_floor"),
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    head = ("| dataset | defense | gate | floor | shadow | adaptive | flipped | known | repeated | LiRA (TPR@0.1%) "
            "| label-only | goal ≤ floor+0.02 | self-audit (learned – upper) | label loss | mean L1 |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def cell(r: dict, v: str) -> str:
        b = r["views"].get(v)
        return "—" if b is None else f"{b['balanced_accuracy']:.3f}"

    for r in rows:
        lira = r["views"].get("reference")
        lira_s = "—" if lira is None else f"{lira['balanced_accuracy']:.3f} ({lira['tpr_at_01pct_fpr']:.1%})"
        lo = max(r["label_only"].values(), default=float("nan"))
        goal = "—" if r["defense"] == "none" else "yes" if r["goal_met"] else "**no**"
        sa = "—" if r["self_audit"] is None else f"{r['self_audit']:.3f} – {r.get('self_audit_upper') or 1:.3f}"
        views = " | ".join(cell(r, v) for v in ("shadow", "adaptive", "flipped", "known", "repeated"))
        name = f"| {r['dataset']} | {r['defense']} | {r.get('gate', '—')} | {r['floor']:.3f}"
        tail = f"{lira_s} | {lo:.3f} | {goal} | {sa} | {r['label_loss']:.3f} | {r['mean_l1']:.4f}"
        lines.append(f"{name} | {views} | {tail} |")
    return "\n".join(lines)


def run_dataset(dataset: str, work: Path, refs_count: int) -> list[dict]:
    root = work / dataset
    log = root / "log.txt"
    facts = build_scenario(dataset, root, members=1500, nonmembers=500, seed=7)
    bundle = root / "bundle"
    export = [sys.executable, "-m", "defense_models", "export", "--model", str(root / "target.onnx"), "--members",
              str(root / "members.npz"), "--nonmembers", str(root / "nonmembers.npz"), "--name", f"user-{dataset}",
              "--quiet", "--out", str(bundle)]  # fmt: skip
    try:
        run(export, log)
    except subprocess.CalledProcessError as exc:
        if exc.returncode != 3:  # 3: the quality gate refused a defense; audit it anyway, and say so
            raise
        print(f"{dataset}: the quality gate refused a defense (see {log}); exporting with --allow-weak-defense")
        run([*export, "--allow-weak-defense"], log)
    manifest = json.loads((bundle / "manifest.json").read_text())
    self_audit = {r["defense"]: r for r in manifest["self_audit"]}
    data = ["--dataset", facts["loader"], *(["--data", facts["data_path"]] if facts["data_path"] else [])]
    run([sys.executable, "-m", "defense_models", "shadows", *data, "--split-file", str(root / "audit_split.npz"),
         "--arch", SHADOW_ARCH[dataset], "--count", str(refs_count), "--quiet", "--out", str(root / "refs")], log,
        OMP_NUM_THREADS="2")  # fmt: skip
    rows = []
    for defense, env in DEFENSES.items():
        with Gateway(bundle, defense, {**env, "OMP_NUM_THREADS": "1"}, root / f"gateway-{defense}.log") as gw:
            report = audit(dataset, facts, bundle, defense, gw.url, root / "refs", root / f"audit-{defense}", log)
        quality = {k: v.get("quality") for k, v in manifest["defenses"].items()}
        rows.append(summarize(dataset, defense, report, self_audit, quality))
        print(table(rows[-1:]), flush=True)
    return [{**r, "scenario": facts, "quality": {k: v.get("quality") for k, v in manifest["defenses"].items()}}
            for r in rows]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["location30", "fashion-mnist"])
    p.add_argument("--refs", type=int, default=16, help="LiRA reference models per dataset")
    p.add_argument("--work", type=Path, default=Path("/tmp/byo-audit"))
    args = p.parse_args()
    rows, seconds = [], {}
    for dataset in args.datasets:
        started = time.perf_counter()
        rows += run_dataset(dataset, args.work, args.refs)
        seconds[dataset] = round(time.perf_counter() - started)
    path = ROOT / "bench" / "results" / "byo_audit.json"
    if path.exists():  # keep the other datasets' rows from earlier runs
        old = json.loads(path.read_text())
        rows = [r for r in old["rows"] if r["dataset"] not in args.datasets] + rows
        seconds = {**old.get("seconds", {}), **seconds}
    md = table(rows)
    print("\n" + md)
    out = {"command": " ".join(sys.argv), "seconds": seconds, "rows": rows}
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    (ROOT / "docs" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "results" / "byo_audit.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
