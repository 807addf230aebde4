"""Finding confidence vectors in text (responses, logs): the fault-injection suite and bench/soak.py use it."""

from __future__ import annotations

import re

import numpy as np

#: four or more probability-like decimals in a row, as a printed vector would look
VECTOR = re.compile(r"(0\.\d{3,}[,;\s\]]+){3,}0\.\d{3,}")


def vector_leaks(text: str, raw: np.ndarray | None = None) -> list[str]:
    """What in ``text`` looks like a confidence vector, or spells a value of ``raw`` (undefended probabilities
    [B, C]) with 4+ significant digits, as %.4f, %.6f or repr would print it; [] if nothing does."""
    found = [m.group(0) for m in VECTOR.finditer(text)]
    if raw is not None:
        for v in np.asarray(raw, dtype=np.float64).ravel():
            if v < 1e-3:  # 0.0000…: too common to mean anything
                continue
            spelled = {f"{v:.4f}", f"{v:.6f}", repr(float(v)), repr(float(np.float32(v)))}
            found += [s for s in spelled if s in text]
    return found
