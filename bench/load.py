"""Load benchmark: single-row /predict, 32 connections, naive baselines vs the gateway with each defense.

Starts each server on 127.0.0.1 in turn (same bundle, same uvicorn settings, one process),
drives it with wrk (Debian package `wrk`) for --duration seconds after a short warm-up, and
prints requests/s, p50/p99 latency, mean rows per batch (the gateway's /metrics) and the server's
RSS side by side, with every defense's throughput relative to ``defense=none`` in the same run.
Every request carries a different row (--rows distinct rows of the bundle's own dataset, cycled), so
per-row work (MemGuard's rounds) is what real traffic costs. Results go to bench/results/load.json.

    python bench/load.py [--duration 20] [--connections 32] [--bundle DIR] [--defenses aeppt memguard]
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402

LUA = """
local bodies = {%s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[i])
end
"""
DEFENSES = ("aeppt", "memguard", "rank_template", "hamp")


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


def scrape(url: str) -> dict[str, float]:
    """The batch-size histogram's sum and count from a gateway's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    found = dict(re.findall(r"^(gateway_batch_size_(?:sum|count)) (\S+)$", text, re.M))
    return {k: float(v) for k, v in found.items()}


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


@contextmanager
def server_process(
    cmd: list[str], env: dict[str, str], url: str, ready_path: str, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A server started from ``cmd``, ready on ``url + ready_path``, its output in ``log`` (default: a temporary
    file, whose tail is printed if it never gets ready); SIGTERM (then kill) on exit."""
    log = log or Path(tempfile.mkstemp(suffix=".log")[1])
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        try:
            wait_ready(url, ready_path)
        except RuntimeError:
            print(log.read_text()[-2000:], file=sys.stderr)
            raise
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def demo_bundle() -> tuple[Path, dict[str, Any]]:
    """The demo bundle (built on first use, cached in the temporary directory) and its manifest."""
    from gateway.demo import ensure_demo_bundle

    bundle = ensure_demo_bundle(Path(tempfile.gettempdir()) / "mi-gateway-bench")
    return bundle, json.loads((bundle / "manifest.json").read_text())


def gateway_command(bundle: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--artifacts", str(bundle), "--port", str(port)]


def gateway_env(metrics_port: int, **extra: str) -> dict[str, str]:
    """This environment without its GATEWAY_ settings, quiet, with /metrics on ``metrics_port``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {**env, "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_METRICS_PORT": str(metrics_port),
            "GATEWAY_NOISE_SECRET": "bench secret", **extra}  # fmt: skip


def bench_one(
    name: str, cmd: list[str], env: dict[str, str], port: int, ready_path: str, lua: Path, args: argparse.Namespace,
    metrics_port: int | None = None,
) -> dict[str, float]:  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    metrics = f"http://127.0.0.1:{metrics_port}"
    with server_process(cmd, env, url, ready_path) as proc:
        run_wrk(url, lua, args.connections, 3)  # warm-up
        before = scrape(metrics) if metrics_port else {}
        result = run_wrk(url, lua, args.connections, args.duration)
        if metrics_port:
            after = scrape(metrics)
            batches = after["gateway_batch_size_count"] - before["gateway_batch_size_count"]
            result["rows_per_batch"] = (after["gateway_batch_size_sum"] - before["gateway_batch_size_sum"]) / batches
        result["peak_rss_mib"] = peak_rss_mib(proc.pid)
    if result["non_2xx"]:
        raise RuntimeError(f"{name}: {int(result['non_2xx'])} non-2xx responses; the benchmark is invalid")
    per_batch = f"{result['rows_per_batch']:5.1f}" if "rows_per_batch" in result else "    -"
    print(
        f"  {name:<40} {result['rps']:>8.0f} req/s   p50 {result['p50_ms']:7.2f} ms   p99 {result['p99_ms']:7.2f} ms"
        f"   rows/batch {per_batch}   peak RSS {result['peak_rss_mib']:4.0f} MiB",
        flush=True,
    )
    return result


def request_rows(bundle: Path, manifest: dict[str, Any], n: int) -> np.ndarray:
    """n distinct rows [n, D]: half the model's training rows, half held-out rows, of the bundle's own dataset
    when it can be loaded (needs the training extra); else Location30-like random binary rows."""
    width = manifest["input"]["width"]
    try:
        from defense_models.training.data import load_dataset

        data = load_dataset(manifest["training"]["config"]["dataset"])
        split = np.load(bundle / "split.npz")
        idx = np.concatenate([split["target_train"][: n // 2], split["eval_nonmember"][: n - n // 2]])
        rows: np.ndarray = data.X[np.random.default_rng(0).permutation(idx)]  # members and non-members mixed
        if rows.shape == (n, width):
            return rows
    except Exception as exc:  # a bring-your-own bundle: no dataset to draw from
        print(f"  (random rows: the bundle's dataset is not available here: {type(exc).__name__})")
    return (np.random.default_rng(0).random((n, width)) < 0.12).astype(np.float32)


def write_lua(rows: np.ndarray) -> Path:
    bodies = ",".join(
        "[==[" + json.dumps({"instances": [[float(v) if v % 1 else int(v) for v in r]]}) + "]==]" for r in rows
    )
    lua = Path(tempfile.mkstemp(suffix=".lua")[1])
    lua.write_text(LUA % bodies)
    return lua


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rows", type=int, default=1000, help="distinct request rows, cycled")
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: the demo bundle, built if needed)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    ap.add_argument("--defenses", nargs="*", default=list(DEFENSES),
                    help="defenses served after defense=none, each compared with it")  # fmt: skip
    ap.add_argument("--placement", nargs="*", default=["memguard"],
                    help="defenses also served with the pre-tuning thread placement and batching "
                         "(2 torch threads, ORT spinning, no fill wait), side by side")  # fmt: skip
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: `apt-get install wrk`", file=sys.stderr)
        return 2
    bundle = args.bundle
    if bundle is None:
        from gateway.demo import ensure_demo_bundle

        bundle = ensure_demo_bundle(Path(tempfile.gettempdir()) / "mi-gateway-bench")
    manifest = json.loads((bundle / "manifest.json").read_text())
    lua = write_lua(request_rows(bundle, manifest, args.rows))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}

    print(
        f"single-row /predict, {args.rows} distinct rows, {args.connections} connections, {args.duration} s each, "
        f"bundle {manifest['name']} {manifest['version']}, {os.cpu_count()} CPUs"
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

    def gateway(key: str, label: str, extra: dict[str, str]) -> None:
        port, metrics_port = free_port(), free_port()
        gw_env = gateway_env(metrics_port, **extra)
        results[key] = bench_one(label, gateway_command(bundle, port), gw_env, port, "/readyz", lua, args, metrics_port)

    gateway("gateway-none", "(b) gateway, defense=none", {})
    gateway("gateway-none-unbatched", "(c) gateway, batching off",
            {"GATEWAY_MAX_BATCH_SIZE": "1", "GATEWAY_MAX_QUEUE_DELAY_MS": "0"})  # fmt: skip
    for defense in args.defenses:
        gateway(f"gateway-{defense}", f"(d) gateway, defense={defense}", {"GATEWAY_DEFENSE": defense})
        if defense == "memguard":  # its answers are paced by default (GATEWAY_TIMING_QUANTUM_MS): also unpaced
            gateway("gateway-memguard-unpaced", "(d) gateway, defense=memguard, quantum 0",
                    {"GATEWAY_DEFENSE": defense, "GATEWAY_TIMING_QUANTUM_MS": "0"})  # fmt: skip
            # ... and with the PyTorch loop instead of the compiled one (what every run before 12-01 served)
            gateway("gateway-memguard-torch-loop", "(d) gateway, defense=memguard, quantum 0, engine=torch",
                    {"GATEWAY_DEFENSE": defense, "GATEWAY_TIMING_QUANTUM_MS": "0",
                     "GATEWAY_MEMGUARD_ENGINE": "torch"})  # fmt: skip
    for defense in args.placement:
        old = {"GATEWAY_DEFENSE": defense, "GATEWAY_TORCH_THREADS": str(os.cpu_count()),
               "GATEWAY_ORT_ALLOW_SPINNING": "true", "GATEWAY_BATCH_FILL_WAIT": "0"}  # fmt: skip
        gateway(f"gateway-{defense}-untuned", f"(e) gateway, defense={defense}, untuned", old)

    best_naive = max(results["naive-sync"]["rps"], results["naive-async"]["rps"])
    ratio = results["gateway-none"]["rps"] / best_naive
    print(f"\n  gateway / best naive throughput: {ratio:.2f}x   (target >= 1.3x)")
    relative = {d: results[f"gateway-{d}"]["rps"] / results["gateway-none"]["rps"] for d in args.defenses}
    for d, r in relative.items():
        print(f"  defense={d} / defense=none throughput: {r:.2f}x")
    write_record(
        args.out,
        "bench/load.py",
        connections=args.connections,
        duration_s=args.duration,
        distinct_rows=args.rows,
        bundle={"name": manifest["name"], "version": manifest["version"]},
        results=results,
        ratio_vs_best_naive=ratio,
        ratio_vs_none=relative,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
