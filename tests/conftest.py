"""Shared fixtures: a tiny real bundle, a fake runner, settings and an in-process client."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from gateway.app import create_app
from gateway.artifacts import Bundle
from gateway.settings import GatewaySettings

WIDTH, CLASSES = 8, 4


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle (ONNX + manifest) written by the offline job's exporter."""
    from defense_models.bundle.export import write_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    rng = np.random.default_rng(0)
    write_bundle(
        out,
        name="tiny",
        model=tiny_model(),
        width=WIDTH,
        classes=CLASSES,
        parity_inputs=rng.normal(size=(64, WIDTH)).astype(np.float32),
    )
    return out


class FakeRunner:
    """Deterministic stand-in for ONNX Runtime: logits = x @ W.

    Special rows: ``x[0] == POISON`` raises for the whole batch; ``x[0] == NAN_ROW`` yields a NaN
    row. Records every batch size; ``delay_s`` simulates a slow model.
    """

    POISON = 999.0
    NAN_ROW = 777.0

    def __init__(
        self,
        width: int = WIDTH,
        classes: int = CLASSES,
        *,
        delay_s: float = 0.0,
        provider: str = "CPUExecutionProvider",
    ) -> None:
        self.W = np.random.default_rng(1).normal(size=(width, classes)).astype(np.float32)
        self.delay_s = delay_s
        self.provider = provider
        self.batches: list[int] = []
        self.lock = threading.Lock()
        self.closed = False

    def run(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(int(x.shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        if (x[:, 0] == self.POISON).any():
            raise RuntimeError("poisoned batch")
        with np.errstate(over="ignore", invalid="ignore"):  # as ONNX Runtime: overflow is inf, silently
            out = x @ self.W  # [B, C]
        out[x[:, 0] == self.NAN_ROW] = np.nan
        return out.astype(np.float32)

    def close(self) -> None:
        self.closed = True


class RaisingDefense:
    """A defense that fails on every batch (register it with ``gateway.defenses.register_defense``)."""

    name = "test_raises"
    randomized = False
    l1_bound = 2.0

    def params(self) -> dict[str, object]:
        return {}

    def defend(self, probs: object, logits: object, keys: object) -> object:
        raise RuntimeError("boom")

    @classmethod
    def from_bundle(cls, bundle: object, overrides: object, device: object) -> RaisingDefense:
        return cls()


def make_settings(bundle: Path, **overrides: Any) -> GatewaySettings:
    """Settings that ignore the caller's .env file. The tests read metrics through the app itself (no metrics
    port, /metrics on the app); tests/integration/test_metrics_exposure.py checks the production defaults."""
    defaults: dict[str, Any] = {"metrics_port": 0, "metrics_public": True}
    return GatewaySettings(_env_file=None, artifacts=bundle, **(defaults | overrides))  # type: ignore[call-arg]


@asynccontextmanager
async def serving(settings: GatewaySettings, runner: Any | None = None) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """Run the app's lifespan and yield an httpx client bound to it (no sockets)."""
    kwargs: dict[str, Callable[[Bundle, GatewaySettings], Any]] = {}
    if runner is not None:
        kwargs["runner_factory"] = lambda bundle, s: runner
    app = create_app(settings, **kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits [N, C] (the fake model's and the fake upstream's probabilities)."""
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def rows(n: int, width: int = WIDTH, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, width)).round(4).tolist()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Read one sample from Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_part = head.partition("{")
        if series != name:
            continue
        found = dict(kv.split("=", 1) for kv in label_part.rstrip("}").split(",") if kv) if label_part else {}
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    raise KeyError(f"{name}{labels} not in metrics")


def has_cuda() -> bool:
    return torch.cuda.is_available()


# --- defenses ---------------------------------------------------------------------------------
DEF_CLASSES = 10


def synthetic_outputs(n: int, classes: int, margin: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [n, C] whose true class leads by about ``margin`` (members: large, non-members: small)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    z[torch.arange(n), y] += margin + torch.randn(n, generator=g, dtype=torch.float64)
    return z, y


def _train_defenders(g_recipe: Any, sub_recipe: Any) -> dict[str, Any]:
    from defense_models.bundle.calibrate import calibrate_aeppt_step
    from defense_models.training.defenders import train_memguard_classifier, train_substitute

    z_in, _ = synthetic_outputs(400, DEF_CLASSES, 6.0, seed=1)
    z_out, _ = synthetic_outputs(400, DEF_CLASSES, 2.0, seed=2)
    p_in, p_out = torch.softmax(z_in, 1), torch.softmax(z_out, 1)
    g = train_memguard_classifier(p_in, p_out, g_recipe)
    sub = train_substitute(p_in, p_in.argmax(1), p_out, p_out.argmax(1), sub_recipe)
    cal = calibrate_aeppt_step(sub, p_in, p_out)
    return {"g": g, "substitute": sub, "calibration": cal, "z_in": z_in, "z_out": z_out}


@pytest.fixture(scope="session")
def defenders() -> dict[str, Any]:
    """MemGuard's g and AEPPT's substitute on raw probabilities, trained quickly on synthetic target outputs
    (C = 10) with the plain recipe: these pin the defenses' mechanics, not the recipe."""
    from defense_models.training.defenders import DefenderRecipe
    from defense_models.training.loop import FitConfig

    quick = DefenderRecipe(FitConfig(epochs=40, batch_size=64, lr=1e-3), balanced=False, standardize=False)
    return _train_defenders(quick, quick)


@pytest.fixture(scope="session")
def log_defenders() -> dict[str, Any]:
    """The same, with the ``saturated`` recipe: g on log features (``log_floor``), standardized, augmented."""
    from defense_models.training.defenders import DEFENDER_RECIPES

    robust = DEFENDER_RECIPES["saturated"]
    return _train_defenders(replace(robust.g, fit=replace(robust.g.fit, epochs=15)),
                            replace(robust.substitute, fit=replace(robust.substitute.fit, epochs=40)))  # fmt: skip


@pytest.fixture(scope="session")
def defended_bundle(tmp_path_factory: pytest.TempPathFactory, defenders: dict[str, Any]) -> Path:
    """A bundle (WIDTH -> DEF_CLASSES) carrying both defender's classifiers."""
    from defense_models.bundle.export import write_bundle
    from gateway.artifacts import DefenseEntry
    from gateway.defenses.classifier import save_weights

    tmp = tmp_path_factory.mktemp("weights")
    save_weights(defenders["g"], tmp / "g")
    save_weights(defenders["substitute"], tmp / "s")
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, 32), torch.nn.ReLU(), torch.nn.Linear(32, DEF_CLASSES))
    with torch.no_grad():
        model[2].weight.mul_(8)  # confident outputs, like an overfit target
    out = tmp_path_factory.mktemp("bundles") / "defended"
    write_bundle(
        out,
        name="defended",
        model=model,
        width=WIDTH,
        classes=DEF_CLASSES,
        parity_inputs=np.random.default_rng(0).normal(size=(64, WIDTH)).astype(np.float32),
        extra_files={"memguard_g.safetensors": (tmp / "g").read_bytes(), "aeppt.safetensors": (tmp / "s").read_bytes()},
        defenses={
            "none": DefenseEntry(),
            "memguard": DefenseEntry(weights="memguard_g.safetensors", params={"epsilon": 1.0}),
            "aeppt": DefenseEntry(
                weights="aeppt.safetensors", params={"step_size": defenders["calibration"].step_size}
            ),
        },
    )
    return out


def keys_for(x: np.ndarray | torch.Tensor, secret: bytes = b"test-secret", context: bytes = b"ctx") -> torch.Tensor:
    from gateway.defenses.keyed import RowKeyer

    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return torch.from_numpy(RowKeyer(secret, context).digests(arr))


# --- rank-preserving defenses -----------------------------------------------------------------------
def softmax_rows(n: int, classes: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    z = torch.randn(n, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return torch.softmax(z, dim=1)


def template_defense(classes: int, per_class: bool = True) -> Any:
    from gateway.defenses.rank import RankTemplate, RankTemplateParams, build_templates

    return RankTemplate(
        build_templates(softmax_rows(400, classes, seed=classes)),
        RankTemplateParams(per_class=per_class),
        torch.device("cpu"),
    )


def hamp_defense(classes: int, features: int = 6, inputs: str = "binary") -> Any:
    from gateway.defenses.rank import Hamp, HampParams

    W = np.random.default_rng(classes).normal(size=(features, classes)) * 4

    def predict(X: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.from_numpy(X.astype(np.float64) @ W), dim=1).numpy()

    defense = Hamp(HampParams(inputs=inputs), torch.device("cpu"))  # type: ignore[arg-type]
    defense.bind_model(predict, features)
    return defense


@contextmanager
def live_gateway(settings: GatewaySettings, runner: Any, log_level: str = "warning") -> Iterator[str]:
    """The app served on 127.0.0.1 in a thread by uvicorn, configured as ``gateway serve`` configures it (header
    limits included), for real HTTP clients; yields its base URL. ``runner`` None: the default (ONNX Runtime on
    the bundle, or the upstream in proxy mode)."""
    import asyncio
    import socket

    import uvicorn

    from gateway.__main__ import server_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port, "log_level": log_level})
    app = create_app(settings, **({} if runner is None else {"runner_factory": lambda bundle, s: runner}))
    server = uvicorn.Server(server_config(app, settings))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
