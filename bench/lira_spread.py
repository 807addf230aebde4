"""Why does LiRA still find members: are the served model's outputs on them shifted, or spread wider?

LiRA compares the served model's logit-confidence φ = log p_y − log(1 − p_y) on a record with the same φ of
reference models that did (IN) or did not (OUT) train on it. For each bundle and its LiRA references this script
prints, over the evaluation members and over the non-members: the served model's mean φ; the references' mean φ
and per-record standard deviation, IN and OUT; and z = (φ − μ_OUT) / σ_OUT per record (its mean, its spread, the
share above 3). A label recipe whose members sit at z ≈ 0 with the non-members' spread leaves LiRA nothing; a
mean above 0 is a shift, a spread above the non-members' is a variance mismatch (LiRA's low-FPR tail).

    python bench/lira_spread.py \\
        --row "selena_reference=artifacts/location30-selena-heldref,artifacts/location30-selena-heldref-refs"

Reads the bundle's ONNX model and its records as the audit does (``RawOnnxPredictor``, ``load_sets``: its raw
output, so run it on a replacement served without an output defense) and writes ``bench/results/lira_spread.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._record import write_record  # noqa: E402
from defense_models.audit.attacks.lira import logit_confidence  # noqa: E402
from defense_models.audit.config import AuditConfig  # noqa: E402
from defense_models.audit.predictors import RawOnnxPredictor  # noqa: E402
from defense_models.audit.run import load_sets  # noqa: E402
from defense_models.audit.views import softmax_predict  # noqa: E402
from defense_models.training.shadows import load_shadows  # noqa: E402
from gateway.artifacts import load_bundle  # noqa: E402


def spread(bundle: Path, references: Path) -> dict[str, dict[str, float]]:
    """{members|nonmembers: the statistics above} for one bundle and its reference directory."""
    sets = load_sets(AuditConfig(bundle=bundle), load_bundle(bundle))  # the bundle's own dataset and split
    data, parts = sets.data, sets.parts
    rows = np.concatenate([parts["target_train"], parts["eval_nonmember"]])  # [N]
    refs = load_shadows(references, data)
    position = {int(r): i for i, r in enumerate(refs[0][1].pool_rows)}
    idx = np.array([position[int(r)] for r in rows])  # pool positions of the evaluation rows
    X, y = data.X[rows], data.y[rows]
    phi = logit_confidence(RawOnnxPredictor(bundle).predict(X), y)  # [N]
    ref_phi = np.stack([logit_confidence(softmax_predict(m.eval())(X), y) for m, _ in refs])  # [K, N]
    inside = np.stack([np.asarray(meta.in_mask, bool)[idx] for _, meta in refs])  # [K, N]
    stats = {side: per_record(ref_phi, inside == (side == "in")) for side in ("in", "out")}  # (μ, σ) [N] each
    z = (phi - stats["out"][0]) / np.maximum(stats["out"][1], 1e-6)  # [N]
    n = len(parts["target_train"])
    out = {}
    for name, part in (("members", slice(0, n)), ("nonmembers", slice(n, None))):
        out[name] = {"phi": float(phi[part].mean()), "in_mean": float(stats["in"][0][part].mean()),
                     "out_mean": float(stats["out"][0][part].mean()), "in_sd": float(stats["in"][1][part].mean()),
                     "out_sd": float(stats["out"][1][part].mean()), "z_mean": float(z[part].mean()),
                     "z_sd": float(z[part].std()), "z_above_3": float((z[part] > 3).mean())}  # fmt: skip
    return out


def per_record(values: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values, chosen [K, N] -> per column, the mean and standard deviation of the chosen values [N] each."""
    count = chosen.sum(axis=0).clip(min=1)
    mean = np.where(chosen, values, 0.0).sum(axis=0) / count
    var = np.where(chosen, (values - mean) ** 2, 0.0).sum(axis=0) / count
    return mean, np.sqrt(var)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=BUNDLE,REFERENCES")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lira_spread.json")
    args = ap.parse_args()
    print(f"{'row':<28} {'records':<10} {'φ':>7} {'μ_IN':>7} {'μ_OUT':>7} {'σ_IN':>6} {'σ_OUT':>6} {'z mean':>7} "
          f"{'z sd':>6} {'z > 3':>6}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for item in args.row:
        label, paths = item.split("=", 1)
        bundle, references = paths.split(",", 1)
        result = spread(Path(bundle), Path(references))
        rows.append({"row": label, "bundle": bundle, "references": references, **result})
        for name, s in result.items():
            print(f"{label:<28} {name:<10} {s['phi']:+7.3f} {s['in_mean']:+7.3f} {s['out_mean']:+7.3f} "
                  f"{s['in_sd']:6.3f} {s['out_sd']:6.3f} {s['z_mean']:+7.3f} {s['z_sd']:6.3f} {s['z_above_3']:6.3f}",
                  flush=True)  # fmt: skip
    write_record(args.out, "bench/lira_spread.py", rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
