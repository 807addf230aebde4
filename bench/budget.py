"""Query budgets across replicas: what a client gets from two gateways, and what the Redis backend costs.

1. Sharing: two gateway processes, the same budget (--rate rows/s, bursts of --burst), one client spreading
   single-row requests over both for --duration seconds. One budget admits at most burst + rate × duration
   rows; `memory` (each replica its own) admits up to twice that, `redis` (shared) should admit it once.
2. Cost: one gateway with defense=none at 32 connections (wrk), budgets off, `memory` and `redis` (a budget
   nothing exceeds), in alternating rounds, so the Redis round trip per request is priced side by side.

Starts Debian's redis-server on 127.0.0.1 (apt-get install redis-server). Results: bench/results/budget.json.

    python bench/budget.py [--duration 10] [--rate 50] [--burst 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

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
from tests.redis_server import redis_server  # noqa: E402


async def spread_client(urls: list[str], body: bytes, duration_s: float, workers: int = 8) -> dict[str, int]:
    """One client (one address) sending single-row requests round-robin over ``urls`` as fast as answered."""
    counts = {"200": 0, "429": 0, "other": 0}
    deadline = time.monotonic() + duration_s

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        n = i
        while time.monotonic() < deadline:
            r = await client.post(urls[n % len(urls)] + "/predict", content=body,
                                  headers={"Content-Type": "application/json"})  # fmt: skip
            counts[str(r.status_code) if r.status_code in (200, 429) else "other"] += 1
            n += 1

    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.gather(*(worker(i, client) for i in range(workers)))
    return counts


def sharing(bundle: Path, body: bytes, redis_url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    budget = {"GATEWAY_QUERY_BUDGET_ROWS_PER_S": str(args.rate), "GATEWAY_QUERY_BUDGET_BURST": str(args.burst)}
    cap = args.burst + args.rate * args.duration
    out = {}
    for backend in ("memory", "redis"):
        extra = {**budget, "GATEWAY_BUDGET_BACKEND": backend, "GATEWAY_BUDGET_REDIS_URL": redis_url,
                 "GATEWAY_BUDGET_REDIS_PREFIX": f"bench:{backend}:{time.time()}:"}  # fmt: skip
        ports = [free_port(), free_port()]
        with server_process(gateway_command(bundle, ports[0]), gateway_env(free_port(), **extra),
                            f"http://127.0.0.1:{ports[0]}", "/readyz"), \
             server_process(gateway_command(bundle, ports[1]), gateway_env(free_port(), **extra),
                            f"http://127.0.0.1:{ports[1]}", "/readyz"):  # fmt: skip
            counts = asyncio.run(spread_client([f"http://127.0.0.1:{p}" for p in ports], body, args.duration))
        out[backend] = {**counts, "admitted_over_one_budget": counts["200"] / cap}
        print(f"  {backend:<7} two replicas: {counts['200']:5d} rows admitted, {counts['429']:6d} refused, "
              f"{counts['other']} other = {counts['200'] / cap:.2f}x one budget ({cap:.0f} rows)",
              flush=True)  # fmt: skip
    return out


def cost(bundle: Path, lua: Path, redis_url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    never = {"GATEWAY_QUERY_BUDGET_ROWS_PER_S": "1e9", "GATEWAY_QUERY_BUDGET_BURST": "1024"}
    variants: dict[str, dict[str, str]] = {
        "off": {},
        "memory": {**never, "GATEWAY_BUDGET_BACKEND": "memory"},
        "redis": {**never, "GATEWAY_BUDGET_BACKEND": "redis", "GATEWAY_BUDGET_REDIS_URL": redis_url},
    }
    rps: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, extra in variants.items():
            port, metrics_port = free_port(), free_port()
            env = gateway_env(metrics_port, **extra)
            result = bench_one(f"round {r + 1}, budgets {name}", gateway_command(bundle, port), env, port, "/readyz",
                               lua, args, metrics_port)  # fmt: skip
            rps[name].append(result["rps"])
    for name in ("memory", "redis"):
        ratios = [a / b for a, b in zip(rps[name], rps["off"], strict=True)]
        print(f"  budgets {name} / off: {statistics.median(ratios):.2f}x (rounds: "
              + ", ".join(f"{x:.2f}" for x in ratios) + ")")  # fmt: skip
    return rps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "budget.json")
    args = ap.parse_args()
    bundle, manifest = demo_bundle()
    rows = request_rows(bundle, manifest, 1000)
    body = json.dumps({"instances": [rows[0].tolist()]}).encode()
    with redis_server() as redis_url:
        print(f"1. one client over two replicas, budget {args.rate:g} rows/s, bursts of {args.burst}, "
              f"{args.duration} s")  # fmt: skip
        shared = sharing(bundle, body, redis_url, args)
        print(f"2. defense=none, {args.connections} connections, {args.duration} s, {args.rounds} alternating rounds")
        rps = cost(bundle, write_lua(rows), redis_url, args)
    write_record(args.out, "bench/budget.py", bundle={"name": manifest["name"], "version": manifest["version"]},
                 rate=args.rate, burst=args.burst, duration_s=args.duration, sharing=shared, rps=rps)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
