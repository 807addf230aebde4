"""Load benchmark: single-row /predict, 32 connections, naive baselines vs the gateway with each defense.

Starts each server on 127.0.0.1 in turn (same bundle, same uvicorn settings, one process),
drives it with wrk (Debian package `wrk`) for --duration seconds after a short warm-up, and
prints requests/s and p50/p99 latency side by side, with every defense's throughput relative to
``defense=none`` in the same run. Results go to bench/results/load.json.

    python bench/load.py [--duration 20] [--connections 32] [--bundle DIR] [--defenses rank_template hamp]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, path: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + path, timeout=1):
                return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def parse_wrk(out: str) -> dict[str, float]:
    def ms(v: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s)", v)
        assert m, v
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": ms(pct["50"]),
        "p99_ms": ms(pct["99"]),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def run_wrk(url: str, lua: Path, connections: int, duration: int) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua), url + "/predict"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def bench_one(
    name: str, cmd: list[str], env: dict[str, str], port: int, ready_path: str, lua: Path, args: argparse.Namespace
) -> dict[str, float]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, ready_path)
        run_wrk(url, lua, args.connections, 3)  # warm-up
        result = run_wrk(url, lua, args.connections, args.duration)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if result["non_2xx"]:
        raise RuntimeError(f"{name}: {int(result['non_2xx'])} non-2xx responses; the benchmark is invalid")
    print(
        f"  {name:<36} {result['rps']:>9.0f} req/s   p50 {result['p50_ms']:6.2f} ms   p99 {result['p99_ms']:6.2f} ms"
        f"   non-2xx {int(result['non_2xx'])}",
        flush=True,
    )
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: the demo bundle, built if needed)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    ap.add_argument("--defenses", nargs="*", default=["rank_template", "hamp"],
                    help="defenses served after defense=none, each compared with it")  # fmt: skip
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: `apt-get install wrk`", file=sys.stderr)
        return 2
    bundle = args.bundle
    if bundle is None:
        from gateway.demo import ensure_demo_bundle

        bundle = ensure_demo_bundle(Path(tempfile.gettempdir()) / "mi-gateway-bench")
    manifest = json.loads((bundle / "manifest.json").read_text())
    width = manifest["input"]["width"]
    row = (np.random.default_rng(0).random(width) < 0.12).astype(int).tolist()  # a Location30-like binary row
    lua = Path(tempfile.mkstemp(suffix=".lua")[1])
    lua.write_text(LUA % json.dumps({"instances": [row]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}

    print(
        f"single-row /predict, {args.connections} connections, {args.duration} s each, bundle {manifest['name']} "
        f"{manifest['version']}, {os.cpu_count()} CPUs"
    )
    results: dict[str, dict[str, float]] = {}
    for mode in ("sync", "async"):
        port = free_port()
        results[f"naive-{mode}"] = bench_one(
            f"(a) naive FastAPI ({mode})",
            [sys.executable, str(ROOT / "bench" / "baselines" / "naive_server.py"), str(bundle), str(port), mode],
            env,
            port,
            "/docs",
            lua,
            args,
        )
    port = free_port()
    gw_env = {**env, "GATEWAY_LOG_LEVEL": "warning"}
    results["gateway-none"] = bench_one(
        "(b) gateway, defense=none",
        [sys.executable, "-m", "gateway", "serve", "--artifacts", str(bundle), "--port", str(port)],
        gw_env,
        port,
        "/readyz",
        lua,
        args,
    )

    port = free_port()
    results["gateway-none-unbatched"] = bench_one(
        "(c) gateway, batching off",
        [sys.executable, "-m", "gateway", "serve", "--artifacts", str(bundle), "--port", str(port)],
        {**gw_env, "GATEWAY_MAX_BATCH_SIZE": "1", "GATEWAY_MAX_QUEUE_DELAY_MS": "0"},
        port,
        "/readyz",
        lua,
        args,
    )

    for defense in args.defenses:
        port = free_port()
        results[f"gateway-{defense}"] = bench_one(
            f"(d) gateway, defense={defense}",
            [sys.executable, "-m", "gateway", "serve", "--artifacts", str(bundle), "--port", str(port)],
            {**gw_env, "GATEWAY_DEFENSE": defense, "GATEWAY_NOISE_SECRET": "bench/load.py secret"},
            port,
            "/readyz",
            lua,
            args,
        )

    best_naive = max(results["naive-sync"]["rps"], results["naive-async"]["rps"])
    ratio = results["gateway-none"]["rps"] / best_naive
    print(f"\n  gateway / best naive throughput: {ratio:.2f}x   (target >= 1.3x, p99 <= 30 ms)")
    relative = {d: results[f"gateway-{d}"]["rps"] / results["gateway-none"]["rps"] for d in args.defenses}
    for d, r in relative.items():
        print(f"  defense={d} / defense=none throughput: {r:.2f}x")
    write_record(
        args.out,
        "bench/load.py",
        connections=args.connections,
        duration_s=args.duration,
        bundle={"name": manifest["name"], "version": manifest["version"]},
        results=results,
        ratio_vs_best_naive=ratio,
        ratio_vs_none=relative,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
