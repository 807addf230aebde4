"""The naive baseline: a plain FastAPI handler calling ``session.run`` per request.

No batching, no defense, pydantic request model: what a model owner writes first. Two variants,
so the comparison is against the stronger one: ``sync`` (a ``def`` handler, run in Starlette's
thread pool) and ``async`` (an ``async def`` handler calling ORT on the event loop).

    python bench/baselines/naive_server.py BUNDLE_DIR PORT sync|async
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Req(BaseModel):
    instances: list[list[float]]


def build(bundle: Path, mode: str) -> FastAPI:
    manifest = json.loads((bundle / "manifest.json").read_text())
    ort.set_default_logger_severity(4)
    session = ort.InferenceSession(str(bundle / manifest["model_file"]), providers=["CPUExecutionProvider"])
    app = FastAPI()

    def run(req: Req) -> dict[str, object]:
        logits = session.run(None, {"input": np.asarray(req.instances, dtype=np.float32)})[0]
        e = np.exp(logits - logits.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        return {"probabilities": p.tolist(), "labels": p.argmax(1).tolist()}

    if mode == "sync":

        @app.post("/predict")
        def predict_sync(req: Req) -> dict[str, object]:
            return run(req)
    else:

        @app.post("/predict")
        async def predict_async(req: Req) -> dict[str, object]:
            return run(req)

    return app


if __name__ == "__main__":
    bundle, port, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    uvicorn.run(build(bundle, mode), host="127.0.0.1", port=port, log_level="warning", access_log=False)
