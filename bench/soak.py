"""Soak: two gateways (MemGuard and AEPPT) under a fixed request rate for --duration seconds.

Each gateway serves the demo bundle with its defense. An open-loop client sends distinct rows at a fixed rate
to each (--memguard-rate and --aeppt-rate requests/s; one request in ten is an OIP V2 infer of 4 rows, the
rest single-row /predict), whatever the answers' latency, and counts every answer that is not 200. Every
--sample seconds it reads each gateway's RSS and open file descriptors. RSS growth is measured from the end of
the first minute (warm-up: allocator pools, ORT arenas) to the end. Pass: 0 errors, RSS growth ≤ 5%.
The gateways' logs are scanned for anything that looks like a confidence vector.

    python bench/soak.py [--duration 600] [--memguard-rate 100] [--aeppt-rate 300]

Results: bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from bench.load import demo_bundle, free_port, gateway_command, gateway_env, request_rows, server_process  # noqa: E402
from tests.leaks import vector_leaks  # noqa: E402

WARM_UP_S = 60.0
MAX_BACKLOG = 2048  # requests due but not yet sent, per gateway; beyond it the generator counts an error


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


class OpenLoop:
    """Requests at a fixed rate to one gateway over ``connections`` keep-alive HTTP/1.1 connections, counted by
    status, whatever their latency (measured from when each was due). A light client of its own (pre-encoded
    requests on asyncio streams): an HTTP library would take a core of this 2-core machine at these rates."""

    def __init__(self, url: str, manifest: dict[str, Any], rows: np.ndarray, rate: float, connections: int = 32):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.rate, self.connections = rate, connections
        self.requests = [self._encode(manifest, rows, i) for i in range(len(rows))]
        self.counts: dict[str, int] = {}
        self.latencies: list[float] = []

    def _encode(self, manifest: dict[str, Any], rows: np.ndarray, i: int) -> bytes:
        if i % 10 == 9:  # an OIP V2 infer of 4 rows
            x = rows[[(i + k) % len(rows) for k in range(4)]]
            tensor = {"name": manifest["input"]["name"], "shape": list(x.shape), "datatype": "FP32",
                      "data": x.ravel().tolist()}  # fmt: skip
            path, body = f"/v2/models/{manifest['name']}/infer", json.dumps({"inputs": [tensor]}).encode()
        else:
            path, body = "/predict", json.dumps({"instances": [rows[i].tolist()]}).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        return head.encode() + body

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def _connection(self, due: asyncio.Queue[tuple[int, float] | None]) -> None:
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        try:
            while (item := await due.get()) is not None:
                i, at = item
                writer.write(self.requests[i % len(self.requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                self.latencies.append(time.monotonic() - at)
                self._count(head.split(b" ", 2)[1].decode())
        except (OSError, asyncio.IncompleteReadError) as exc:
            self._count(type(exc).__name__)
        finally:
            writer.close()

    async def run(self, duration_s: float) -> None:
        due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        workers = [asyncio.create_task(self._connection(due)) for _ in range(self.connections)]
        start, i = time.monotonic(), 0
        while (at := start + i / self.rate) < start + duration_s:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if due.qsize() >= MAX_BACKLOG:
                self._count("generator_backlog")  # the gateway fell this far behind: counted as an error
            else:
                due.put_nowait((i, at))
            i += 1
        for _ in workers:
            due.put_nowait(None)
        await asyncio.gather(*workers)

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000
        sent = sum(self.counts.values())
        return {"requests": sent, "counts": self.counts, "errors": sent - self.counts.get("200", 0),
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}  # fmt: skip


async def sample(pids: dict[str, int], every_s: float, until: float, out: dict[str, list[tuple[float, float, int]]],
                 t0: float) -> None:  # fmt: skip
    while time.monotonic() < until:
        for name, pid in pids.items():
            rss, fds = proc_stats(pid)
            out[name].append((time.monotonic() - t0, rss, fds))
        await asyncio.sleep(every_s)


def growth(samples: list[tuple[float, float, int]]) -> dict[str, float]:
    after_warm_up = [s for s in samples if s[0] >= WARM_UP_S] or samples
    base, end = after_warm_up[0], after_warm_up[-1]
    return {"rss_start_mib": base[1], "rss_end_mib": end[1], "rss_max_mib": max(s[1] for s in after_warm_up),
            "rss_growth": end[1] / base[1] - 1, "fds_start": base[2], "fds_end": end[2]}  # fmt: skip


async def soak(targets: dict[str, tuple[OpenLoop, int]], args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in targets}
    pids = {name: pid for name, (_, pid) in targets.items()}
    sampler = asyncio.create_task(sample(pids, args.sample, t0 + args.duration, samples, t0))
    await asyncio.gather(*(loop.run(args.duration) for loop, _ in targets.values()))
    await sampler
    return {name: {**loop.summary(), **growth(samples[name]), "rate": loop.rate, "samples": samples[name]}
            for name, (loop, _) in targets.items()}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--memguard-rate", type=float, default=100)
    ap.add_argument("--aeppt-rate", type=float, default=300)
    ap.add_argument("--sample", type=float, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = ap.parse_args()
    bundle, manifest = demo_bundle()
    rows = request_rows(bundle, manifest, 1000).astype(float)
    logs = {d: Path(tempfile.mkstemp(suffix=f"-{d}.log")[1]) for d in ("memguard", "aeppt")}
    rates = {"memguard": args.memguard_rate, "aeppt": args.aeppt_rate}
    print(f"soak: {args.duration:g} s; memguard at {args.memguard_rate:g} req/s, aeppt at {args.aeppt_rate:g} req/s; "
          f"demo bundle {manifest['name']} {manifest['version']}", flush=True)  # fmt: skip
    with ExitStack() as stack:
        targets = {}
        for defense, rate in rates.items():
            port = free_port()
            env = gateway_env(free_port(), GATEWAY_DEFENSE=defense, GATEWAY_LOG_LEVEL="info")
            url = f"http://127.0.0.1:{port}"
            cmd = gateway_command(bundle, port)
            proc = stack.enter_context(server_process(cmd, env, url, "/readyz", logs[defense]))
            targets[defense] = (OpenLoop(url, manifest, rows, rate), proc.pid)
        results = asyncio.run(soak(targets, args))
    ok = True
    print(f"\n  {'gateway':<9} {'requests':>9} {'errors':>7} {'p50 ms':>7} {'p99 ms':>7} {'RSS 1 min':>10} "
          f"{'RSS end':>8} {'max':>6} {'growth':>7} {'fds':>9} {'log':>5}")  # fmt: skip
    for name, r in results.items():
        leaked = len(vector_leaks(logs[name].read_text()))
        r["log_vector_matches"] = leaked
        ok &= r["errors"] == 0 and r["rss_growth"] <= 0.05 and leaked == 0
        print(f"  {name:<9} {r['requests']:>9} {r['errors']:>7} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
              f"{r['rss_start_mib']:>9.0f}M {r['rss_end_mib']:>7.0f}M {r['rss_max_mib']:>5.0f}M "
              f"{r['rss_growth']:>+7.1%} {r['fds_start']:>4}->{r['fds_end']:<4} "
              f"{leaked if leaked else 'clean':>5}")  # fmt: skip
        if r["errors"]:
            print(f"    non-200: { {k: v for k, v in r['counts'].items() if k != '200'} }")
    print(f"\n  {'PASS' if ok else 'FAIL'}: 0 errors and RSS growth <= 5% after the first minute")
    write_record(args.out, "bench/soak.py", duration_s=args.duration, bundle={"name": manifest["name"],
                 "version": manifest["version"]}, results=results, passed=ok)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
