"""Deployment files, checked without a Docker engine or a cluster: structure, schemas, and that every
setting, port and metric they name exists in the code."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway.__main__ import DRAIN_MARGIN_S
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
METRICS = {m.name for m in GatewayMetrics(max_batch_size=8).registry.collect()}  # base names, no _total


def metric_names(expr: str) -> set[str]:
    return {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            for n in re.findall(r"\bgateway_[a-z0-9_]+", expr)}  # fmt: skip


def dockerfile() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_installs_only_the_serving_extra_and_runs_as_non_root() -> None:
    lines = dockerfile()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installed = set(re.findall(r"\./src\[([a-z,]+)\]", " ".join(lines)))
    assert installed == {"serve"} and "serve" in extras
    assert not any(line.startswith("COPY") and "defense_models" in line for line in lines)
    final_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM")) :]
    users = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(line for line in final_stage if line.startswith("ENV"))
    port = re.search(r"GATEWAY_PORT=(\d+)", env).group(1)  # type: ignore[union-attr]
    assert f"EXPOSE {port}" in final_stage
    health = next(line for line in final_stage if line.startswith("HEALTHCHECK"))
    assert f"127.0.0.1:{port}/healthz" in health
    assert any(line.startswith("ENTRYPOINT") and "gateway" in line and "serve" in line for line in final_stage)
    assert any("VARIANT" in line for line in lines)  # the CPU-only build argument
    pins = dict(re.findall(r"ARG (TORCH_VERSION|ORT_VERSION)=(\S+)", " ".join(lines)))
    assert set(pins) == {"TORCH_VERSION", "ORT_VERSION"}  # the pinned CUDA 13 pair
    assert '"onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}"' in " ".join(lines)
    assert not any(re.search(r"pip install [^|]*\bonnxruntime[=\s\[]", line) for line in lines)  # never both wheels


def test_compose_wires_gateway_upstream_and_monitoring() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gateway", "triton", "prometheus", "grafana"} <= set(services)
    gw = services["gateway"]
    env = gw["environment"]
    assert set(env) <= {f"GATEWAY_{n.upper()}" for n in GatewaySettings.model_fields}
    assert env["GATEWAY_UPSTREAM_URL"].startswith("http://triton:")
    assert all(v.endswith(":ro") for v in gw["volumes"]) and gw["read_only"] is True
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"gateway:{env['GATEWAY_METRICS_PORT']}"  # never the public port: metrics are per-row
    assert gw["ports"] == [f"{env['GATEWAY_PORT']}:{env['GATEWAY_PORT']}"]  # only the public port is published


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["apiVersion"].startswith("monitoring.coreos.com"):
                continue  # a CRD: checked structurally below
            kv.validate(doc, "1.33.0", strict=True)


def test_kubernetes_manifests_fit_together() -> None:
    docs = {d["kind"]: d for d in k8s_documents()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "Secret", "Job"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    gateway = next(c for c in pod["initContainers"] if c["name"] == "gateway")
    assert gateway["restartPolicy"] == "Always"  # native sidecar
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # A native sidecar's startup probe gates the model server's start, and /readyz waits for the model server:
    # startup must not wait for readiness, or the pod deadlocks.
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in gateway["env"]}
    assert set(env) <= {f"GATEWAY_{n.upper()}" for n in GatewaySettings.model_fields}
    assert "secretKeyRef" in env["GATEWAY_NOISE_SECRET"]["valueFrom"]
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": int(env["GATEWAY_PORT"]["value"]), "metrics": int(env["GATEWAY_METRICS_PORT"]["value"])}
    assert gateway["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert all(m.get("readOnly") for m in gateway["volumeMounts"] if m["name"] == "artifacts")
    model_server = pod["containers"][0]
    assert model_server["resources"]["limits"]["nvidia.com/gpu"] == 1
    upstream_port = int(env["GATEWAY_UPSTREAM_URL"]["value"].rsplit(":", 1)[1])
    assert model_server["readinessProbe"]["httpGet"]["port"] == upstream_port
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"] == labels
    assert docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service_ports = {p["name"] for p in docs["Service"]["spec"]["ports"]}
    assert all(e["port"] in service_ports for e in docs["ServiceMonitor"]["spec"]["endpoints"])
    policy = docs["NetworkPolicy"]["spec"]  # clients reach the http port; only the monitoring namespace /metrics
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = {p["port"]: rule.get("from") for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed["http"] is None and allowed["metrics"] and "namespaceSelector" in allowed["metrics"][0]
    # Termination: the model server stops first (its preStop holds it while the gateway drains), then the sidecar.
    hold = model_server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert hold >= gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > hold + gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    # ... and the gateway's drain deadline, plus the server's margin, fits in what is left of the grace period
    # (5 s kept for the model server's own exit), so no accepted request is cut off without an answer.
    drain = float(env["GATEWAY_DRAIN_TIMEOUT_S"]["value"]) + DRAIN_MARGIN_S
    gateway_hold = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert hold + 5 + gateway_hold + drain <= pod["terminationGracePeriodSeconds"]
    job = docs["Job"]["spec"]
    for spec in (pod, job["template"]["spec"]):
        assert spec["automountServiceAccountToken"] is False
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    claims = {d["metadata"]["name"] for d in k8s_documents() if d["kind"] == "PersistentVolumeClaim"}
    used = {v["persistentVolumeClaim"]["claimName"] for spec in (pod, job["template"]["spec"])
            for v in spec["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert used <= claims, f"claims nothing defines: {used - claims}"
    image = job["template"]["spec"]["containers"][0]["image"]
    built = re.findall(r"-t (\S+) \.", (DEPLOY / "train.Dockerfile").read_text())
    assert image in built, "the shadow Job's image must be the one deploy/train.Dockerfile builds"
    assert (
        job["completionMode"] == "Indexed"
        and "$JOB_COMPLETION_INDEX" in job["template"]["spec"]["containers"][0]["args"][0]
    )


def test_dashboard_and_alerts_use_real_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "mi-gateway.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used <= METRICS, used - METRICS
    for needed in ("request_duration", "batch_size", "queue_wait", "l1_distortion", "label_changes", "model_info"):
        assert any(needed in e for e in exprs), needed
    assert any('outcome="fallback"' in e for e in exprs)
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"GatewayLabelChanged", "GatewayDefenseFallbacks",
                                           "GatewayDefenseIneffective", "GatewayHighP99Latency",
                                           "GatewayNotReady", "GatewayBudgetBackendDown"}  # fmt: skip
    assert set().union(*(metric_names(r["expr"]) for r in rules)) <= METRICS
