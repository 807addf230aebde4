"""What pacing MemGuard's answers (GATEWAY_TIMING_QUANTUM_MS) costs users: quantum 0 vs 50 ms, alternating.

1. Closed loop: wrk, --connections fixed connections, single-row /predict with distinct demo rows (each client
   waits for its answer before sending again, so extra latency means fewer requests).
2. Open loop: --rate requests/s offered over 64 connections (bench/soak.py's client), single rows, whatever the
   answers' latency: does the capacity change?

    python bench/quantum_cost.py [--rounds 2] [--connections 32] [--rate 200] [--duration 15]

Results: bench/results/quantum_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from bench.load import (  # noqa: E402
    bench_one,
    demo_bundle,
    free_port,
    gateway_command,
    gateway_env,
    request_rows,
    server_process,
    write_lua,
)
from bench.soak import OpenLoop  # noqa: E402

QUANTA = ("0", "50")


def open_loop(
    bundle: Path, manifest: dict[str, Any], rows: Any, quantum: str, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = gateway_env(free_port(), GATEWAY_DEFENSE="memguard", GATEWAY_TIMING_QUANTUM_MS=quantum)
    with server_process(gateway_command(bundle, port), env, url, "/readyz"):
        for seconds in (5, args.duration):  # a warm-up, then the measured run
            loop = OpenLoop(url, manifest, rows, args.rate, connections=64)
            loop.requests = [r for i, r in enumerate(loop.requests) if i % 10 != 9]  # single rows only
            asyncio.run(loop.run(seconds))
    s = loop.summary()
    print(f"  open loop, quantum {quantum:>2} ms, {args.rate:g} req/s offered: {s['requests']} sent, "
          f"{s['errors']} errors, p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms", flush=True)  # fmt: skip
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantum_cost.json")
    args = ap.parse_args()
    bundle, manifest = demo_bundle()
    rows = request_rows(bundle, manifest, 1000)
    lua = write_lua(rows)
    closed: dict[str, list[dict[str, float]]] = {q: [] for q in QUANTA}
    opened: dict[str, list[dict[str, Any]]] = {q: [] for q in QUANTA}
    for r in range(args.rounds):
        for q in QUANTA:
            port, metrics_port = free_port(), free_port()
            env = gateway_env(metrics_port, GATEWAY_DEFENSE="memguard", GATEWAY_TIMING_QUANTUM_MS=q)
            closed[q].append(bench_one(f"closed loop, quantum {q} ms, round {r + 1}", gateway_command(bundle, port),
                                       env, port, "/readyz", lua, args, metrics_port))  # fmt: skip
    for _ in range(args.rounds):
        for q in QUANTA:
            opened[q].append(open_loop(bundle, manifest, rows.astype(float), q, args))
    write_record(args.out, "bench/quantum_cost.py", bundle={"name": manifest["name"], "version": manifest["version"]},
                 closed_loop=closed, open_loop=opened)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
