"""CPU cost per row of each served defense, in one run: the "CPU cost" column of the README's choice table.

Loads a bundle, runs its model once on evaluation-like rows, and times the release path the gateway runs per
batch (``defend_batch``: keys from the quantized outputs, the defense, the invariant checks) at one batch size
for every defense, side by side. ``hamp``'s extra forward pass goes through the bundle's ONNX model, as in the
gateway. One torch thread and one ONNX Runtime thread, so the numbers are CPU time per row.

    python bench/release_cost.py [--bundle artifacts/location30] [--batch 64] [--rows 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from gateway.artifacts import load_bundle  # noqa: E402
from gateway.defenses import create_defense  # noqa: E402
from gateway.defenses.base import ModelBound  # noqa: E402
from gateway.defenses.keyed import RowKeyer, output_key_rows  # noqa: E402
from gateway.defenses.simplex import logits_from_probs  # noqa: E402
from gateway.pipeline import defend_batch  # noqa: E402
from gateway.runner import OnnxRunner  # noqa: E402

DEFENSES = ("none", "rank_template", "hamp", "memguard", "aeppt", "topk")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "artifacts" / "location30")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "release_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    runner = OnnxRunner(bundle.model_path, input_name=m.input.name, output_name=m.output.name, prefer_cuda=False,
                        intra_op_threads=1)  # fmt: skip
    rng = np.random.default_rng(0)
    X = (rng.random((args.rows, m.input.width)) < 0.12).astype(np.float32)  # Location30-like binary rows

    def probs_of(x: np.ndarray) -> np.ndarray:
        z = runner.run(x).astype(np.float64)
        return softmax(z) if m.output.kind == "logits" else z / z.sum(axis=1, keepdims=True)

    P = torch.from_numpy(probs_of(X))  # [N, C]
    keyer = RowKeyer(b"bench/release_cost.py", b"bench")
    print(f"{m.name} {m.version}: {args.rows} rows in batches of {args.batch}, 1 thread")
    results = {}
    for name in args.defenses:
        defense = create_defense(name, bundle, {}, torch.device("cpu"))
        if isinstance(defense, ModelBound):
            defense.bind_model(probs_of, m.input.width)
        t0 = time.perf_counter()
        for i in range(0, args.rows, args.batch):
            p = P[i : i + args.batch]
            keys = torch.from_numpy(keyer.digests(output_key_rows(p.numpy())))
            defend_batch(defense, p, logits_from_probs(p).float(), keys, p.argmax(dim=1))
        per_row_us = (time.perf_counter() - t0) / args.rows * 1e6
        results[name] = {"us_per_row": round(per_row_us, 1)}
        print(f"  {name:<14} {per_row_us:10.1f} µs per row", flush=True)
    write_record(args.out, "bench/release_cost.py", bundle={"name": m.name, "version": m.version},
                 batch=args.batch, rows=args.rows, results=results)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
