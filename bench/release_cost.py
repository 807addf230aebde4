"""CPU cost of each served defense, in one run: the "CPU cost" column of the README's choice table.

Loads a bundle (default: Location30's; ``--bundle demo``: the embedded demo bundle), runs its model once on
rows of the bundle's own dataset (half training rows, half held-out; Location30-like random rows when the
dataset is not available), and times the release path the gateway runs per batch (``defend_batch``: keys
from the quantized outputs, the defense, the invariant checks) for every defense side by side, at each
``--batches`` size. ``hamp``'s extra forward pass goes through the bundle's ONNX model, as in the gateway.
One torch thread and one ONNX Runtime thread (the gateway's default placement), so µs per row is CPU time.

    python bench/release_cost.py [--bundle artifacts/location30|demo] [--batches 1 32 64] [--rows 1024]
        [--defenses none memguard memguard:later_round_steps=100 ...]  (NAME:KEY=VALUE,... overrides parameters)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from bench.load import request_rows  # noqa: E402
from gateway.artifacts import load_bundle  # noqa: E402
from gateway.defenses import create_defense  # noqa: E402
from gateway.defenses.base import ModelBound  # noqa: E402
from gateway.defenses.keyed import RowKeyer, output_key_rows  # noqa: E402
from gateway.defenses.simplex import logits_from_probs  # noqa: E402
from gateway.demo import ensure_demo_bundle  # noqa: E402
from gateway.pipeline import defend_batch  # noqa: E402
from gateway.runner import OnnxRunner  # noqa: E402

DEFENSES = ("none", "rank_template", "hamp", "memguard", "aeppt", "topk")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "artifacts" / "location30"))
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "release_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = Path(args.bundle)
    if args.bundle == "demo":
        path = ensure_demo_bundle(Path(tempfile.gettempdir()) / "mi-gateway-bench")
    bundle = load_bundle(path)
    m = bundle.manifest
    runner = OnnxRunner(bundle.model_path, input_name=m.input.name, output_name=m.output.name, prefer_cuda=False,
                        intra_op_threads=1)  # fmt: skip
    X = request_rows(path, m.model_dump(mode="json"), args.rows)

    def probs_of(x: np.ndarray) -> np.ndarray:
        z = runner.run(x).astype(np.float64)
        return softmax(z) if m.output.kind == "logits" else z / z.sum(axis=1, keepdims=True)

    P = torch.from_numpy(probs_of(X))  # [N, C]
    keyer = RowKeyer(b"bench/release_cost.py", b"bench")
    print(f"{m.name} {m.version}: {args.rows} rows, batches of {args.batches}, 1 thread")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for spec in args.defenses:
        name, _, rest = spec.partition(":")  # e.g. memguard:later_round_steps=100
        overrides = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
        defense = create_defense(name, bundle, overrides, torch.device("cpu"))
        if isinstance(defense, ModelBound):
            defense.bind_model(probs_of, m.input.width)
        results[spec] = {}
        for batch in args.batches:
            rows = min(args.rows, max(batch * 8, 64))  # at least 8 batches

            def release(i: int, batch: int = batch, defense: object = defense) -> None:
                p = P[i : i + batch]
                keys = torch.from_numpy(keyer.digests(output_key_rows(p.numpy())))
                defend_batch(defense, p, logits_from_probs(p).float(), keys, p.argmax(dim=1))  # type: ignore[arg-type]

            release(args.rows - batch)  # warm-up, on rows outside the timed ones when there are enough
            t0 = time.perf_counter()
            for i in range(0, rows - batch + 1, batch):
                release(i)
            done = (rows // batch) * batch
            per_row_us = (time.perf_counter() - t0) / done * 1e6
            results[spec][str(batch)] = {"us_per_row": round(per_row_us, 1), "ms_per_batch": per_row_us * batch / 1e3}
            print(f"  {spec:<14} batch {batch:4d} {per_row_us:10.1f} µs per row {per_row_us * batch / 1e3:9.2f} ms per "
                  f"batch {1e6 / per_row_us:9.0f} rows/s", flush=True)  # fmt: skip
    write_record(args.out, "bench/release_cost.py", bundle={"name": m.name, "version": m.version},
                 batches=args.batches, rows=args.rows, results=results)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
