"""Model runners: the expensive boundary, behind a Protocol so tests can use a fake.

``OnnxRunner`` asks ONNX Runtime for ``CUDAExecutionProvider`` then ``CPUExecutionProvider``
and reads back what it actually got (``session.get_providers()``): ORT only *logs* a failed CUDA
load and silently runs on CPU (microsoft/onnxruntime#23372). The expected "cannot load
libcublasLt" error on CPU machines is kept out of the log by raising ORT's log severity to FATAL
for the probe only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger("gateway.runner")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@runtime_checkable
class ModelRunner(Protocol):
    #: The execution provider actually in use (``CUDAExecutionProvider``, ``CPUExecutionProvider``,
    #: or e.g. ``upstream`` for a proxy runner).
    provider: str

    def run(self, x: np.ndarray) -> np.ndarray:
        """x[B, D] float32 -> outputs[B, C] float32 (logits or probabilities, per the manifest).

        Blocking; called from the batch worker thread, never from the event loop.
        """
        ...

    def close(self) -> None: ...


class OnnxRunner:
    def __init__(
        self,
        model_path: Path,
        *,
        input_name: str,
        output_name: str,
        prefer_cuda: bool = True,
        intra_op_threads: int = 0,
        allow_spinning: bool = True,
    ) -> None:
        import onnxruntime as ort  # deferred: importing ORT costs ~100 ms

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        # Spinning keeps intra-op threads busy-waiting after each run: fast back-to-back runs, but it takes the
        # core a CPU defense needs next (gateway/threads.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        wanted = ([CUDA] if prefer_cuda and CUDA in ort.get_available_providers() else []) + [CPU]
        previous = 2  # ORT's default severity (warning)
        ort.set_default_logger_severity(4)  # FATAL only: the CUDA probe's load error is expected on CPU hosts
        try:
            try:
                session = ort.InferenceSession(str(model_path), options, providers=wanted)
            except Exception as exc:  # with CUDA_PATH set, a failed CUDA EP may raise (onnxruntime#21424)
                if wanted == [CPU]:
                    raise
                log.warning("CUDA execution provider failed to initialise (%s); retrying on CPU", type(exc).__name__)
                session = ort.InferenceSession(str(model_path), options, providers=[CPU])
        finally:
            ort.set_default_logger_severity(previous)
        self._session = session
        self.provider: str = session.get_providers()[0]
        self.requested: list[str] = wanted
        self._input = input_name
        self._output = output_name
        names_in = [i.name for i in session.get_inputs()]
        names_out = [o.name for o in session.get_outputs()]
        if input_name not in names_in or output_name not in names_out:
            raise ValueError(
                f"{model_path.name} has inputs {names_in} and outputs {names_out}, but the manifest names "
                f"{input_name!r} -> {output_name!r}; rebuild the bundle"
            )

    def run(self, x: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self._output], {self._input: x})
        return np.asarray(out, dtype=np.float32)  # [B, C]

    def close(self) -> None:
        self._session = None
