"""The timing attacker against a live gateway: does a single-row query's latency tell members from non-members?

Starts the gateway on the demo bundle once per (defense, GATEWAY_TIMING_QUANTUM_MS) pair and runs the audit's
timing probe over HTTP (`defense_models audit --timing-probe`): --rows members and non-members of the bundle's own
split, interleaved, each queried alone --repeats times, scored on its fastest answer (AUC and balanced accuracy
at the best threshold, either orientation: the attacker's best case on these rows). Nothing else runs meanwhile.

    python bench/timing.py [--rows 200] [--repeats 3]

Results: bench/results/timing.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from bench.load import demo_bundle, free_port, gateway_command, gateway_env, server_process  # noqa: E402

#: (defense, GATEWAY_TIMING_QUANTUM_MS or None for the defense's default)
CASES = (("none", None), ("aeppt", None), ("memguard", "0"), ("memguard", None))



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1, help="copies of the row in each query (amplifies its work)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "timing.json")
    ap.add_argument("--cases", nargs="*", default=[f"{d}:{q or 'default'}" for d, q in CASES],
                    help="defense:quantum_ms pairs, quantum 'default' for the defense's own")  # fmt: skip
    args = ap.parse_args()
    from defense_models.audit.config import AuditConfig
    from defense_models.audit.predictors import GatewayPredictor
    from defense_models.audit.queries import timing_probe
    from defense_models.audit.views import Sets
    from defense_models.training.data import load_dataset
    bundle, manifest = demo_bundle()
    split = np.load(bundle / "split.npz")
    sets = Sets(load_dataset(manifest["training"]["config"]["dataset"]),
                {role: split[role] for role in ("target_train", "eval_nonmember")})  # fmt: skip
    config = AuditConfig(bundle=bundle, url="http://gateway", timing_probe_rows=args.rows,
                         timing_probe_repeats=args.repeats, timing_probe_copies=args.copies)  # fmt: skip
    print(f"timing attacker over HTTP: {args.rows} members and {args.rows} non-members, {args.repeats} queries "
          f"each, {args.copies} copies of the row per query, demo bundle {manifest['name']} "
          f"{manifest['version']}")  # fmt: skip
    print(f"  {'defense':<9} {'quantum':>9} {'AUC':>6} {'noise 95%':>9} {'p':>6} {'bal. acc.':>9} "
          f"{'median ms (members / non-members)':>36}")  # fmt: skip
    results = []
    for case in args.cases:
        defense, _, q = case.partition(":")
        quantum = None if q in ("", "default") else q
        port = free_port()
        extra = {"GATEWAY_DEFENSE": defense, **({"GATEWAY_TIMING_QUANTUM_MS": quantum} if quantum else {})}
        url = f"http://127.0.0.1:{port}"
        with server_process(gateway_command(bundle, port), gateway_env(free_port(), **extra), url, "/readyz"), \
                GatewayPredictor.over_http(url) as predictor:  # fmt: skip
            probe = timing_probe(config, predictor, sets)
        shown = "default" if quantum is None else f"{quantum} ms"
        print(f"  {defense:<9} {shown:>9} {probe.auc:>6.3f} {probe.noise_auc_95:>9.3f} {probe.p_value:>6.3f} "
              f"{probe.balanced_accuracy:>9.3f} "
              f"{probe.member_median_ms:>22.2f} / {probe.nonmember_median_ms:.2f}", flush=True)  # fmt: skip
        results.append({"defense": defense, "quantum_ms": quantum, **probe.model_dump()})
    write_record(args.out, "bench/timing.py", bundle={"name": manifest["name"], "version": manifest["version"]},
                 rows=args.rows, repeats=args.repeats, copies=args.copies, results=results)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
