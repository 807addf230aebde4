"""Typed runtime settings, read once at startup from ``GATEWAY_*`` variables.

Precedence (highest first): keyword arguments (the CLI flags), environment variables, a ``.env``
file in the working directory, the defaults below. Nothing here runs at import time; the app
factory receives a built ``GatewaySettings`` and never reads the environment itself.
"""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.threads import ThreadPlan, plan_threads

#: The placeholder secret. Accepted only in demo/development mode: with a known secret an
#: attacker could recompute every keyed coin and strip the noise.
DEFAULT_NOISE_SECRET = "insecure-development-secret"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        env_nested_delimiter="__",
        env_ignore_empty=True,
    )

    # --- what to serve -------------------------------------------------------------------
    artifacts: Path | None = Field(None, description="Artifact bundle directory (manifest.json, model.onnx, ...).")
    demo: bool = Field(False, description="Serve the embedded Location30 demo bundle (built on first use).")
    demo_cache: Path = Field(
        Path.home() / ".cache" / "mi-gateway",
        description="Where the demo bundle is built and cached.",
    )
    defense: str = Field("none", description="Defense applied to every confidence vector (see `gateway.defenses`).")
    defense_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the manifest's defense parameters: GATEWAY_DEFENSE_PARAMS__EPSILON=0.5, or "
        "GATEWAY_<DEFENSE>_<PARAM> (GATEWAY_MEMGUARD_EPSILON=0.5), which wins. The defense validates them.",
    )
    on_defense_error: Literal["reject", "label_only"] = Field(
        "reject",
        description="A row whose defense fails: reject its request (503) or release the one-hot label.",
    )

    # --- upstream proxy mode (the sidecar) ----------------------------------------------------
    upstream_url: str | None = Field(
        None, description="Forward batches to this model server instead of running the bundle's ONNX model."
    )
    upstream_protocol: Literal["oip", "json"] = Field(
        "oip", description="oip: Open Inference Protocol V2 (KServe, Triton); json: {instances} -> {predictions}."
    )
    upstream_model: str | None = Field(None, description="Model name on the upstream (OIP); default: the manifest's.")
    upstream_input_field: str = Field("instances", description="JSON upstream: request field holding the rows.")
    upstream_output_field: str | None = Field(
        None, description="Response tensor/field with the outputs (json default: predictions; oip: the first output)."
    )
    upstream_output_kind: Literal["logits", "probabilities"] | None = Field(
        None, description="What the upstream returns; default: the manifest's output kind."
    )
    upstream_timeout_s: float = Field(
        5.0, gt=0, description="Per-attempt deadline of an upstream call: connect, send and the whole answer."
    )
    upstream_deadline_s: float | None = Field(
        None, gt=0, description="All attempts and backoffs of one upstream call; default: the timeout × (retries + 1)."
    )
    upstream_retries: int = Field(2, ge=0, le=10, description="Retries on connection errors, timeouts and 502/503/504.")
    upstream_max_connections: int = Field(32, ge=1, description="Pooled connections to the upstream.")

    # --- network -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="Serve /metrics on this separate port (bound to GATEWAY_HOST), for a scraper inside the "
        "cluster; 0: no metrics port. Per-row distortion metrics tell a client what happened to its query, "
        "so clients must not reach it (docs/API.md, Metrics).",
    )
    metrics_public: bool = Field(
        False, description="Also serve /metrics on the public port. Only where clients cannot reach that port."
    )
    metrics_token: SecretStr | None = Field(
        None, description="When set, /metrics (either port) needs `Authorization: Bearer <token>`."
    )

    # --- batching and limits ---------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, description="Rows per model+defense call.")
    max_queue_delay_ms: float = Field(
        1.0, ge=0, description="How long the first queued row waits for batch-mates before a flush."
    )
    batch_fill_wait: float = Field(
        0.03,
        ge=0,
        le=1,
        description="With a slow pipeline, the first queued row may wait up to this fraction of a batch's recent "
        "processing time for batch-mates (if longer than GATEWAY_MAX_QUEUE_DELAY_MS); 0: off.",
    )
    timing_quantum_ms: float | None = Field(
        None,
        ge=0,
        description="A batch's answers leave at the first multiple of this many ms after the batch started, so "
        "latency does not tell how much work the defense did for a row; default: the defense's own (MemGuard "
        "50, the others 0); 0: off.",
    )
    batch_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A model+defense call still running after this is stuck: its requests and the queued ones get "
        "503, and readiness and liveness fail until it returns (a restart is the only cure for a hung native call).",
    )
    max_queue_rows: int = Field(4096, ge=1, description="Rows waiting at most; beyond it requests get 429.")
    max_batch_rows: int = Field(1024, ge=1, description="Rows one request may carry.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request line and headers accepted; beyond it 431 and the connection closes.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Request line and headers must arrive within this; else 408 and the connection closes."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="The body must arrive within this once the headers have; else 408."
    )

    query_budget_rows_per_s: float | None = Field(
        None, gt=0, description="Per-client budget (API key, else address) in rows/s; beyond it 429. Off by default."
    )
    query_budget_burst: int = Field(1024, ge=1, description="Rows a client may send at once within its budget.")
    budget_backend: Literal["memory", "redis"] = Field(
        "memory",
        description="Where budgets live: this process (each replica its own), or Redis (shared by every replica; "
        "if Redis is unreachable a replica charges its own bucket and counts gateway_budget_backend_errors_total).",
    )
    budget_redis_url: SecretStr | None = Field(
        None, description="redis://[user:password@]host:port/db for GATEWAY_BUDGET_BACKEND=redis (a secret)."
    )
    budget_redis_prefix: str = Field(
        "{mi-gateway}:budget:",
        description="Key prefix: replicas that share a prefix share budgets. The {hash tag} keeps every bucket in "
        "one Redis Cluster slot (one script call charges several clients).",
    )
    budget_redis_timeout_s: float = Field(
        0.25, gt=0, description="Connect and reply timeout of one budget call to Redis."
    )
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated addresses or networks (CIDR) of proxies whose X-Forwarded-For is believed "
        "when keying query budgets by address; empty: the peer's address.",
    )

    drain_timeout_s: float = Field(
        20.0,
        gt=0,
        description="On SIGTERM, requests still queued this long after it get 503 with Retry-After; the server "
        "closes connections by this + 5 s. Keep it under terminationGracePeriodSeconds minus the preStop sleeps.",
    )

    # --- runtime ---------------------------------------------------------------------------
    require_gpu: bool = Field(False, description="Stay not-ready unless ONNX Runtime runs on CUDA.")
    ort_intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = its default).")
    ort_allow_spinning: bool | None = Field(
        None,
        description="Whether ONNX Runtime's intra-op threads spin-wait after a run; default: yes, except before "
        "a defense with long batches (MemGuard): spinning takes the core it runs on next.",
    )
    torch_threads: int = Field(
        0, ge=0, description="Torch intra-op threads for the defense (0 = 1: measured fastest, docs/BENCHMARKS.md)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or one JSON object per line (with the request id while serving one)."
    )
    access_log: bool = Field(False, description="uvicorn access log (method, path, status; never bodies).")

    # --- secrets ---------------------------------------------------------------------------
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="Comma-separated bearer keys; when set, inference routes need one."
    )
    api_keys_file: Path | None = Field(None, description="File with one API key per line (a mounted secret).")
    noise_secret: SecretStr = Field(
        SecretStr(DEFAULT_NOISE_SECRET),
        description="Key of the per-row HMAC that seeds the defense's randomness.",
    )
    noise_key: Literal["output", "input"] = Field(
        "output",
        description="What keys a row's randomness: its clean output quantized to GATEWAY_NOISE_KEY_GRID "
        "(near-duplicate inputs share it) or its exact input bytes (only exact repeats share it).",
    )
    noise_key_grid: float = Field(
        0.02, gt=0, le=1, description="Cell width of the output key: outputs in one cell share a draw."
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(p.strip() for p in value.split(",") if p.strip())
        for p in value if isinstance(value, tuple | list) else ():
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"GATEWAY_TRUSTED_PROXIES: {p!r} is not an address or a CIDR network") from None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @model_validator(mode="before")
    @classmethod
    def _named_defense_params(cls, data: Any) -> Any:
        """``GATEWAY_<DEFENSE>_<PARAM>`` (e.g. GATEWAY_MEMGUARD_EPSILON) for the chosen defense, into
        ``defense_params``. The defense's own parameter model validates them (ranges live there only)."""
        if not isinstance(data, dict):
            return data
        defense = str(data.get("defense") or "none")
        prefix = f"GATEWAY_{defense.upper()}_"
        named = {k[len(prefix) :].lower(): v for k, v in os.environ.items() if k.upper().startswith(prefix) and v}
        if not named:
            return data
        return {**data, "defense_params": {**dict(data.get("defense_params") or {}), **named}}

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if self.artifacts is None and not self.demo:
            raise ValueError("nothing to serve: set GATEWAY_ARTIFACTS (or --artifacts DIR), or use --demo")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"GATEWAY_API_KEYS_FILE={self.api_keys_file} does not exist")
        if self.budget_backend == "redis" and self.budget_redis_url is None:
            raise ValueError("GATEWAY_BUDGET_BACKEND=redis needs GATEWAY_BUDGET_REDIS_URL (redis://host:port/db)")
        return self

    # --- derived ---------------------------------------------------------------------------
    @property
    def development(self) -> bool:
        """Demo mode is the only development mode: it permits the default noise secret."""
        return self.demo

    def threads(self) -> ThreadPlan:
        """Thread placement with its defaults resolved (gateway/threads.py; looks up the defense's class)."""
        return plan_threads(torch_threads=self.torch_threads, ort_intra_op_threads=self.ort_intra_op_threads,
                            ort_allow_spinning=self.ort_allow_spinning, defense=self.defense)  # fmt: skip

    @cached_property
    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``trusted_proxies`` parsed once."""
        return tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)

    def all_api_keys(self) -> tuple[bytes, ...]:
        """Configured keys (environment plus file), as bytes for constant-time comparison."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines() if line.strip()]
        return tuple(k.encode() for k in keys)

    def metrics_token_bytes(self) -> bytes | None:
        """``metrics_token`` as bytes for constant-time comparison (None: /metrics needs no token)."""
        return self.metrics_token.get_secret_value().encode() if self.metrics_token else None

    def uses_default_secret(self) -> bool:
        secret = self.noise_secret.get_secret_value()
        return secret in ("", DEFAULT_NOISE_SECRET)
