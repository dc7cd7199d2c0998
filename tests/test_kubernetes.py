"""deploy/kubernetes, validated offline: core kinds against the Kubernetes API schemas
(kubernetes-validate), the custom resources' structure, the PrometheusRule against
``promtool check rules`` and against alerts.yml (one source), and every probe path and port
against the monitor's own routes and settings."""

from __future__ import annotations

import math
import runpy
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client import CollectorRegistry

from orchestrator.core.converters import to_duration
from orchestrator.core.settings import load_settings
from orchestrator.monitor.api import ControlPlane, create_app

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are checked against
CORE_KINDS = {"DaemonSet", "Deployment", "Service", "ConfigMap", "Secret"}
CUSTOM = {
    "PodMonitor": ("monitoring.coreos.com/v1", ("selector", "podMetricsEndpoints")),
    "PrometheusRule": ("monitoring.coreos.com/v1", ("groups",)),
    "ScaledObject": ("keda.sh/v1alpha1", ("scaleTargetRef", "triggers")),
}
MAX_INSTANCES = 8  # what the DaemonSet's grace period is sized for (one GPU each)


def manifests() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/kubernetes (not the kustomizations), by path relative to it."""
    out = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, f"{path}: one manifest per file"
        out[str(path.relative_to(K8S))] = docs[0]
    return out


def by_kind(kind: str) -> dict[str, Any]:
    [doc] = [d for d in manifests().values() if d["kind"] == kind]
    return doc


def container(doc: dict[str, Any]) -> dict[str, Any]:
    [main] = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "orchestrator"]
    return main


def settings_env() -> dict[str, str]:
    return {str(k): str(v) for k, v in by_kind("ConfigMap")["data"].items()}


def test_every_core_manifest_is_valid_for_the_stated_kubernetes_version() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    seen = set()
    for name, doc in manifests().items():
        if doc["kind"] in CUSTOM:
            continue
        assert doc["kind"] in CORE_KINDS, f"{name}: unexpected kind {doc['kind']}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {'.'.join(str(p) for p in exc.path)}")
        seen.add(doc["kind"])
    assert seen == CORE_KINDS


def test_the_custom_resources_have_their_api_version_and_required_fields() -> None:
    kinds = {}
    for name, doc in manifests().items():
        if doc["kind"] not in CUSTOM:
            continue
        api_version, required = CUSTOM[doc["kind"]]
        assert doc["apiVersion"] == api_version, name
        assert doc["metadata"]["name"], name
        missing = [f for f in required if f not in doc["spec"]]
        assert not missing, f"{name}: spec lacks {missing}"
        kinds[doc["kind"]] = doc
    assert set(kinds) == set(CUSTOM)
    scaled = kinds["ScaledObject"]
    target = scaled["spec"]["scaleTargetRef"]
    pool = by_kind("Deployment")
    assert (target["kind"], target["name"]) == ("Deployment", pool["metadata"]["name"])
    assert "comfyui_machine_jobs_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]


def test_the_kustomizations_list_every_manifest_but_the_secret_example() -> None:
    listed = {str((K8S / r).resolve().relative_to(K8S)) for r in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]}
    keda = {
        str((K8S / "keda" / r).resolve().relative_to(K8S))
        for r in yaml.safe_load((K8S / "keda" / "kustomization.yaml").read_text())["resources"]
    }
    assert listed | keda == set(manifests()) - {"secret.example.yaml"}
    assert all((K8S / p).is_file() for p in listed | keda)


def test_the_generated_manifests_are_up_to_date() -> None:
    generate = runpy.run_path(str(K8S / "generate.py"))
    for path, text in generate["outputs"]().items():
        assert path.read_text() == text, f"{path.name} is stale: run python deploy/kubernetes/generate.py"


def test_the_prometheus_rule_holds_exactly_the_alerts_of_alerts_yml() -> None:
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert by_kind("PrometheusRule")["spec"]["groups"] == alerts["groups"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_promtool_checks_the_prometheus_rules_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": by_kind("PrometheusRule")["spec"]["groups"]}))
    r = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_probe_path_and_port_exists_in_the_monitor() -> None:
    settings = load_settings({"ROOT": "/nonexistent", **settings_env()})
    app = create_app(cast(ControlPlane, object()), settings, CollectorRegistry())
    routes = set(app.openapi()["paths"])
    assert {"/healthz", "/readyz", "/metrics", "/scaling"} <= routes
    for doc in (by_kind("DaemonSet"), by_kind("Deployment")):
        main = container(doc)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert ports["monitor"] == settings.orchestrator_port
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = main[probe]["httpGet"]
            assert get["path"] in routes, f"{probe}: {get['path']} is not a monitor route"
            assert get["port"] in ports, f"{probe}: no container port named {get['port']}"
        assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"  # the orchestrator's own health
        assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service_port = by_kind("Service")["spec"]["ports"][0]
    assert service_port["targetPort"] in ports
    endpoint = by_kind("PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in ports
    assert endpoint["path"] in routes


def test_the_monitor_listens_where_the_kubelet_reaches_it_and_one_bad_gpu_keeps_it_ready() -> None:
    env = settings_env()
    assert env["ORCHESTRATOR_LISTEN"] == "0.0.0.0"
    assert env["MIN_READY_INSTANCES"] == "1"
    secret = by_kind("Secret")["stringData"]
    assert "ORCHESTRATOR_TOKEN" in secret  # a non-loopback monitor refuses to start without it
    refs = [next(iter(r)) for r in container(by_kind("DaemonSet"))["envFrom"]]
    assert refs == ["configMapRef", "secretRef"]


def test_the_grace_period_covers_the_drain_and_stopping_every_instance() -> None:
    env = settings_env()
    drain = to_duration(env["SHUTDOWN_DRAIN_TIMEOUT"])
    stop = to_duration(env["STOP_TIMEOUT"])
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= math.ceil(drain + MAX_INSTANCES * stop + 15)


def test_the_startup_probe_waits_out_the_worst_cold_boot_and_the_pod_gets_every_gpu() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    main = container(by_kind("DaemonSet"))
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 45 * 60
    assert main["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    [root] = [v for v in pod["volumes"] if v["name"] == "root"]
    assert root["hostPath"]["path"]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts["root"] == next(e["value"] for e in main["env"] if e["name"] == "ROOT")
