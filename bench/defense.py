"""Defense throughput: batched MemGuard and AEPPT vs the serial reference, and vs the FLOP floor.

For 30 and 100 classes it trains the defender's classifiers on synthetic target outputs
(members: the label leads by ~6 logits, non-members by ~2), then times ``defend`` at batch sizes
1, 8, 64, 512 and 4096 on the chosen device, next to the one-row-at-a-time autograd reference
from ``tests/reference.py`` in the same run.

The FLOP floor is the time the matmuls of the steps actually run would take at the device's
measured matmul rate (a 2048³ sgemm, best of 10, measured before and after; the higher is used):
MemGuard ≈ 4·(C·256 + 256·128 + 128·64 + 64) FLOPs per row-iteration (forward and input gradient
of g), AEPPT ≈ 4·256·C + 4·256·64 + 2·64. Rows whose gradient is reused still count in full.

    python bench/defense.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from defense_models.bundle.calibrate import calibrate_aeppt_step  # noqa: E402
from defense_models.training.defenders import DefenderRecipe, train_memguard_classifier, train_substitute  # noqa: E402
from defense_models.training.loop import FitConfig  # noqa: E402
from gateway.defenses.aeppt import Aeppt, AepptParams  # noqa: E402
from gateway.defenses.keyed import RowKeyer, row_uniforms  # noqa: E402
from gateway.defenses.memguard import MemGuard, MemGuardParams  # noqa: E402
from tests.reference import aeppt_reference_row, memguard_reference_row  # noqa: E402

BATCHES = (1, 8, 64, 512, 4096)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gflops(device: torch.device) -> float:
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    a @ b
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / min(times) / 1e9


def synthetic(n: int, classes: int, margin: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g)
    z[torch.arange(n), torch.randint(0, classes, (n,), generator=g)] += margin + torch.randn(n, generator=g)
    return z


def timed(fn: Any, device: torch.device, min_total_s: float, max_reps: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_total_s or len(times) < 3):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and serial rows")
    ap.add_argument("--classes", type=int, nargs="+", default=[30, 100])
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "defense.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    peak = peak_gflops(device)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}),"
        f" torch threads {torch.get_num_threads()}, measured sgemm peak {peak:.0f} GFLOP/s\n"
    )
    header = (
        f"{'defense':<9} {'C':>4} {'batch':>6} {'ms/batch':>10} {'vectors/s':>11} {'x serial':>9} "
        f"{'iters/row':>9} {'GFLOP/s':>8} {'% floor':>8}"
    )
    print(header)
    print("-" * len(header))
    results: list[dict[str, Any]] = []
    keyer = RowKeyer(b"bench", b"defense")
    for C in args.classes:
        z_in, z_out = synthetic(2048, C, 6.0, 1), synthetic(2048, C, 2.0, 2)
        p_in, p_out = torch.softmax(z_in.double(), 1), torch.softmax(z_out.double(), 1)
        fit = DefenderRecipe(FitConfig(epochs=30, batch_size=64, lr=1e-3), balanced=False, standardize=False)
        g = train_memguard_classifier(p_in[:800], p_out[:800], fit)
        sub = train_substitute(p_in[:800], p_in[:800].argmax(1), p_out[:800], p_out[:800].argmax(1), fit)
        alpha = calibrate_aeppt_step(sub, p_in[:800], p_out[:800]).step_size
        pool_z = torch.cat([z_in, z_out])[torch.randperm(4096, generator=torch.Generator().manual_seed(3))]
        pool_p = torch.softmax(pool_z.double(), 1)
        pool_k = torch.from_numpy(keyer.digests(pool_z.numpy()))
        mg_flops = 4 * (C * 256 + 256 * 128 + 128 * 64 + 64)
        ae_flops = 4 * 256 * C + 4 * 256 * 64 + 2 * 64
        defenses = {
            "memguard": MemGuard(g, MemGuardParams(epsilon=1.0, landing="crossed"), device),
            "aeppt": Aeppt(sub, AepptParams(step_size=alpha), device),
        }
        # the serial references, a few rows each
        n_ref = 2 if args.quick else 4
        t = time.perf_counter()
        for i in range(n_ref):
            memguard_reference_row(g, pool_z[i].double(), int(pool_p[i].argmax()))
        serial = {"memguard": n_ref / (time.perf_counter() - t)}
        r = row_uniforms(pool_k[:20], 100).double()
        ae_params = AepptParams(step_size=alpha)
        t = time.perf_counter()
        for i in range(20):
            aeppt_reference_row(sub, pool_p[i], r[i], ae_params)
        serial["aeppt"] = 20 / (time.perf_counter() - t)
        for name, defense in defenses.items():
            print(f"{name:<9} {C:>4} {'serial':>6} {1e3 / serial[name]:>10.2f} {serial[name]:>11.1f} {'1.0':>9}")
            for B in args.batches:
                z = pool_z[:B].to(device)
                p = pool_p[:B].to(device)
                k = pool_k[:B]
                per_batch = timed(
                    lambda defense=defense, p=p, z=z, k=k: defense.defend(p, z, k),
                    device,
                    0.5 if args.quick else 2.0,
                    5 if B >= 512 else 200,
                )
                if name == "memguard":
                    with torch.inference_mode():
                        work = defense.phase_one(z, p.argmax(1)).row_iterations + B  # + Phase II forward
                    flops = work * mg_flops
                else:
                    work = B * ae_params.iterations
                    flops = work * ae_flops
                vps = B / per_batch
                gflops = flops / per_batch / 1e9
                row = {
                    "defense": name,
                    "classes": C,
                    "batch": B,
                    "ms_per_batch": per_batch * 1e3,
                    "vectors_per_s": vps,
                    "speedup_vs_serial": vps / serial[name],
                    "row_iterations": work,
                    "iterations_per_row": work / B,
                    "gflops": gflops,
                    "pct_of_floor": 100 * gflops / peak,
                    "serial_vectors_per_s": serial[name],
                }
                results.append(row)
                print(
                    f"{name:<9} {C:>4} {B:>6} {per_batch * 1e3:>10.2f} {vps:>11.1f} {vps / serial[name]:>9.1f} "
                    f"{work / B:>9.1f} {gflops:>8.1f} {100 * gflops / peak:>7.1f}%",
                    flush=True,
                )
        print()
    # A shared machine's sgemm rate drifts during a run; a low peak would flatter every row, so the
    # floor uses the higher of the rates measured before and after.
    peak_end = peak_gflops(device)
    peaks = {"start": peak, "end": peak_end}
    peak = max(peak, peak_end)
    print(f"sgemm peak {peaks['start']:.0f} GFLOP/s at the start, {peak_end:.0f} at the end; % of floor against "
          f"{peak:.0f}:")  # fmt: skip
    for r in results:
        r["pct_of_floor"] = 100 * r["gflops"] / peak
        if r["batch"] >= 512:
            print(f"  {r['defense']:<9} C={r['classes']:<4} batch {r['batch']:>5}: {r['pct_of_floor']:.1f}%")
    out = args.out if device.type == "cpu" else args.out.with_name(args.out.stem + "-cuda.json")
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}  # fmt: skip
    write_record(
        out,
        "bench/defense.py",
        machine=machine,
        device=str(device),
        peak_sgemm_gflops=peak,
        peaks=peaks,
        results=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
