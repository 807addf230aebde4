"""A/B of two checkouts of the gateway under the same load, alternating, to price a change on the hot path.

Each checkout is served in turn by ``python -m gateway serve`` run from its own directory (the same bundle,
the same distinct rows and wrk settings as ``bench/load.py``); pairs alternate so drift on a shared machine
hits both sides. Make the second checkout with ``git worktree add /tmp/before <commit>``.

    python bench/ab.py /tmp/before . [--pairs 3] [--duration 12] [--env GATEWAY_DEFENSE=memguard]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import bench_one, free_port, request_rows, write_lua  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=12)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--env", nargs="*", default=[], help="GATEWAY_*=value for both servers")
    args = ap.parse_args()
    from gateway.demo import ensure_demo_bundle

    bundle = ensure_demo_bundle(Path(tempfile.gettempdir()) / "mi-gateway-bench")
    lua = write_lua(request_rows(bundle, json.loads((bundle / "manifest.json").read_text()), 1000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(dict(kv.split("=", 1) for kv in args.env), GATEWAY_LOG_LEVEL="warning",
               GATEWAY_NOISE_SECRET="bench/ab.py secret")  # fmt: skip
    rps: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.pairs):
        for side, tree in (("before", args.before), ("after", args.after)):
            port, metrics_port = free_port(), free_port()
            side_env = {**env, "GATEWAY_METRICS_PORT": str(metrics_port), "PYTHONPATH": str(tree.resolve())}
            cmd = [sys.executable, "-m", "gateway", "serve", "--artifacts", str(bundle), "--port", str(port)]
            cwd = Path.cwd()
            os.chdir(tree)  # `-m gateway` imports the package from the working directory first
            try:
                rps[side].append(bench_one(side, cmd, side_env, port, "/readyz", lua, args, metrics_port)["rps"])
            finally:
                os.chdir(cwd)
    for b, a in zip(rps["before"], rps["after"], strict=True):
        print(f"  pair: before {b:8.0f}  after {a:8.0f} req/s  ({a / b - 1:+.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
