"""The Kubernetes manifests: both Kustomize overlays rendered with kubectl, every document validated against
the Kubernetes 1.30 schemas (kubernetes-validate, strict), scanned with checkov (0 failures; the skips carry
their reasons), and the pieces that must agree with each other checked. Nothing here runs a cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from imgpipe.paths import ROOT

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu")
VENV_OPT = ROOT / ".venv" / "opt"
KUBERNETES_VERSION = "1.30.0"


def _tool(name: str, *candidates: Path) -> str:
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} is missing: make install unpacks or installs it under .venv/opt"
    return found


def render(overlay: str) -> list[dict]:
    kubectl = _tool("kubectl", VENV_OPT / "debian" / "usr" / "bin" / "kubectl")
    text = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_is_valid_kubernetes(rendered: dict[str, list[dict]], overlay: str) -> None:
    docs = rendered[overlay]
    assert sorted(d["kind"] for d in docs) == sorted(
        ["Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
         "HorizontalPodAutoscaler", "NetworkPolicy"]
    )  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "imgpipe"


def test_the_validator_catches_a_misspelled_field(rendered: dict[str, list[dict]]) -> None:
    broken = json.loads(json.dumps(_one(rendered["gpu"], "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_pieces_agree(rendered: dict[str, list[dict]]) -> None:
    gpu, cpu = rendered["gpu"], rendered["cpu"]
    container = _one(gpu, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu_container = _one(cpu, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # imgpipe serve, not a bare tritonserver: the stub supervisor, the drain and the internal-model key come with it
    assert container["command"] == ["imgpipe", "serve"]
    env = {e["name"]: e for e in container["env"]}
    assert env["IMGPIPE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "imgpipe-admin"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    pod = _one(gpu, "Deployment")["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] >= 10000
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    # The HPA's metric is the one the adapter rule publishes.
    hpa = _one(gpu, "HorizontalPodAutoscaler")
    rules = yaml.safe_load(_one(gpu, "ConfigMap")["data"]["config.yaml"])["rules"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rules[0]["name"]["as"]
    assert hpa["spec"]["minReplicas"] == 5 and _one(cpu, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 1
    # Only the public ports are open: HTTP and gRPC to callers, metrics to the monitoring namespace.
    policy = _one(gpu, "NetworkPolicy")["spec"]["ingress"]
    assert sorted(p["port"] for rule in policy for p in rule["ports"]) == [8000, 8001, 8002]
    assert sorted(p["port"] for p in _one(gpu, "Service")["spec"]["ports"]) == [8000, 8001, 8002]
    assert _one(gpu, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_unjustified(rendered: dict[str, list[dict]], overlay: str, tmp_path: Path) -> None:
    checkov = _tool("checkov", VENV_OPT / "checkov" / "bin" / "checkov")
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(rendered[overlay]))
    result = subprocess.run(
        [checkov, "-f", str(path), "--framework", "kubernetes", "--quiet", "--compact", "--skip-download",
         "-o", "json"],
        capture_output=True, text=True, env={"BC_SKIP_MAPPING": "TRUE", "PATH": "/usr/bin:/bin"}, timeout=300,
    )  # fmt: skip
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    summary = report["summary"]
    print(f"checkov {overlay}: {summary}")
    assert summary["failed"] == 0 and summary["passed"] > 50, report.get("results", {}).get("failed_checks")
    annotations = _one(rendered[overlay], "Deployment")["metadata"]["annotations"]
    skips = {k: v for k, v in annotations.items() if k.startswith("checkov.io/skip")}
    assert summary["skipped"] == len(skips) and all(len(v.split("=", 1)[1]) > 20 for v in skips.values())


def test_kserve_alternative_uses_the_triton_runtime() -> None:
    service = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["runtime"] == "kserve-tritonserver"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


# --- the local stack (deploy/compose) -------------------------------------------------------------------------


def test_the_committed_stack_files_are_what_the_code_generates() -> None:
    from imgpipe import deploy

    for name, text in deploy.files().items():
        assert (deploy.COMPOSE / name).read_text() == text, f"deploy/compose/{name}: run `imgpipe deploy-configs`"


def test_promtool_accepts_the_generated_prometheus_config() -> None:
    promtool = _tool("promtool", VENV_OPT / "debian" / "usr" / "bin" / "promtool")
    result = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "compose" / "prometheus.yml")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and "SUCCESS" in result.stdout + result.stderr, result.stderr


def test_compose_file_is_valid_and_lint_clean() -> None:
    import compose_spec

    compose = ROOT / "deploy" / "compose"
    stack = compose_spec.PyCompose.from_yaml((compose / "compose.yaml").read_text())
    assert stack.service_names() == ["tritonserver", "prometheus", "grafana"]
    stack.validate()
    with pytest.raises(ValueError, match="extension key"):  # the validator refuses unknown keys
        compose_spec.PyCompose.from_yaml("services:\n  a:\n    image: x\n    prots: [1]\n")
    lint = _tool("compose-lint", ROOT / ".venv" / "bin" / "compose-lint")
    result = subprocess.run(
        [lint, "check", "--fail-on", "low", "--strict-config", "--config", str(compose / ".compose-lint.yml"),
         str(compose / "compose.yaml")], capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.server
def test_dashboard_queries_metrics_triton_exports_and_prometheus_scrapes_them(server) -> None:  # type: ignore[no-untyped-def]
    from imgpipe import deploy
    from imgpipe.benchmark import fetch_metrics, parse_prometheus
    from imgpipe.loadtest.metrics import PrometheusServer

    exported = {s.name for s in parse_prometheus(fetch_metrics(server.metrics_url))}
    queried = deploy.queried_metrics(deploy.dashboard())
    assert queried - deploy.GPU_METRICS <= exported, queried - exported  # GPU metrics: only with a GPU
    # A real Prometheus with the config code the stack's file comes from, scraping the real server.
    target = server.metrics_url.split("//", 1)[1].split("/", 1)[0]
    prometheus = PrometheusServer(target).start()
    try:
        series = prometheus.query("nv_inference_request_success")
        assert {s["metric"]["model"] for s in series} >= {"remove_background", "detect_faces", "colorize"}
    finally:
        prometheus.close()
