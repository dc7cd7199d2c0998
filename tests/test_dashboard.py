"""The Grafana dashboard and Prometheus examples query only metrics the monitor exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.core.gpus import Gpu, GpuSample
from orchestrator.core.layout import Layout
from orchestrator.core.readiness import GpuStatus, InstanceStatus
from orchestrator.core.scaling import machine_load
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState
from orchestrator.jobs.metrics import JobMetrics
from orchestrator.machine.fs import write_json
from orchestrator.monitor.collectors import MachineCollector
from orchestrator.monitor.metrics import build_registry

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"
PROMETHEUS = REPO / "deploy" / "prometheus"
# Series Prometheus makes itself for every scrape target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan",
}
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (functions, keywords, labels and variables removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _LABEL_LISTS.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or name in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]?", name):
            continue
        names.add(name)
    return names


def test_metric_names_ignores_functions_labels_and_variables() -> None:
    expr = 'sum by (host) (increase(comfyui_instance_restarts_total{host=~"$host"}[15m])) or vector(0)'
    assert metric_names(expr) == {"comfyui_instance_restarts_total"}
    assert metric_names("time() - max(x_seconds{a=\"b\"}) > bool 3") == {"x_seconds"}


def exported_names(tmp_path: Path) -> set[str]:
    """Every sample name the monitor exports when every metric has data."""
    gpu = Gpu(0, "GPU-a", "00000000:01:00.0", "NVIDIA H100 80GB HBM3", 80 * 2**30, "550")
    sample = GpuSample(0, "GPU-a", utilization=1.0, memory_used=1, memory_free=1, temperature=1.0, power=1.0,
                       sm_clock=1.0, memory_clock=1.0)
    status = InstanceStatus(
        gpu=0, name="comfyui_gpu0", port=8188, state=InstanceState.READY, reason="", since=0.0,
        process_state="RUNNING", pid=1, start_time=1.0, uptime=1.0, restarts=0, failed_custom_nodes=("x",),
        queue_pending=0, queue_running=0, last_probe=0.0, probe_duration=0.1, device="cpu",
    )

    class Source:
        supervisord_ok = True

        def instance_statuses(self) -> list[InstanceStatus]:
            return [status]

        def gpu_statuses(self) -> list[GpuStatus]:
            return [GpuStatus(gpu, sample, 0.0)]

    layout = Layout(tmp_path)
    write_json(layout.status_file, {"stages": {"detect": 1.0}, "nodes": {"counts": {"installed": 1}},
                                    "comfy": {"fallback": False}})
    registry = build_registry(Source(), load_settings({"ROOT": str(tmp_path)}), layout, hostname="h")
    jobs = JobMetrics(registry, lambda: {0: 1}, lambda: [])  # the job API's, registered by the JobManager
    jobs.node_seconds.labels("KSampler").observe(1.0)  # labelled: exported once a job has run a node
    registry.register(MachineCollector(lambda: machine_load([], {}, 8)))  # registered by monitor.app.build_app
    return {s.name for family in registry.collect() for s in family.samples}


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    for var in data["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.match(r"label_values\((.*),\s*\w+\)$", query)
            exprs.append(inner.group(1) if inner else query)
    return exprs


def test_every_metric_the_dashboard_queries_is_exported(tmp_path: Path) -> None:
    exported = exported_names(tmp_path) | SYNTHETIC
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert used, "the dashboard queries nothing"
    assert used <= exported, f"not exported by the monitor: {sorted(used - exported)}"


def test_the_dashboard_covers_health_restarts_queues_gpus_and_provisioning() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    required = {
        "comfyui_instance_up", "comfyui_instance_ready", "comfyui_instance_state",
        "comfyui_instance_restarts_total", "comfyui_instance_queue_pending", "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE",
        "orchestrator_stage_duration_seconds",
    }
    assert required <= used, sorted(required - used)


def panels_by_title() -> dict[str, dict[str, Any]]:
    return {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}


def rows() -> dict[str, list[dict[str, Any]]]:
    """Each row's title -> the panels placed below it and above the next row."""
    panels = sorted(json.loads(DASHBOARD.read_text())["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    out: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for p in panels:
        if p["type"] == "row":
            current = p["title"]
            out[current] = []
        else:
            out.setdefault(current, []).append(p)
    return out


def test_the_jobs_downloads_and_gpu_fault_rows_hold_their_panels() -> None:
    def used(row: str) -> set[str]:
        return set().union(*(metric_names(t["expr"]) for p in rows()[row] for t in p.get("targets", [])))

    assert {"comfyui_jobs_total", "comfyui_job_duration_seconds_bucket", "comfyui_job_queue_wait_seconds_bucket",
            "comfyui_instance_jobs_in_flight", "comfyui_node_execution_seconds_bucket",
            "comfyui_job_nodes_cached_total"} <= used("Jobs")
    assert {"orchestrator_download_bytes", "orchestrator_download_files",
            "orchestrator_download_throughput_bytes_per_second"} <= used("Downloads")
    assert used("GPU faults") == {"orchestrator_gpu_failed"}
    slowest = panels_by_title()["Slowest node types (p95, 1 h)"]
    assert "by (class_type, le)" in slowest["targets"][0]["expr"]
    assert slowest["fieldConfig"]["defaults"]["unit"] == "s"


def test_no_two_panels_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def color(panel: dict[str, Any], value: float) -> str:
    """The colour a stat panel shows for ``value`` (absolute thresholds, as Grafana applies them)."""
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    chosen = steps[0]["color"]
    for step in steps[1:]:
        if value >= step["value"]:
            chosen = step["color"]
    return str(chosen)


def test_every_stat_panel_has_thresholds_and_bad_values_are_not_green() -> None:
    panels = panels_by_title()
    for p in panels.values():
        if p["type"] == "stat":
            thresholds = p["fieldConfig"]["defaults"].get("thresholds")
            assert thresholds, f"stat panel {p['title']!r} has no thresholds"
            assert thresholds["mode"] == "absolute"
            assert len(thresholds["steps"]) >= 2, p["title"]
    assert color(panels["Instances ready"], 0) == "red"
    assert color(panels["Instances ready"], 3) == "green"
    assert color(panels["Instances up"], 0) == "red"
    assert color(panels["supervisord"], 0) == "red"
    assert color(panels["Fallback ComfyUI in use"], 1) != "green"
    assert color(panels["Failed custom nodes"], 2) != "green"
    assert color(panels["Lost GPUs"], 0) == "green"
    assert color(panels["Lost GPUs"], 1) == "red"


def test_units_match_what_the_metrics_count() -> None:
    panels = panels_by_title()
    for p in panels.values():
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        exprs = " ".join(t["expr"] for t in p.get("targets", []))
        assert unit != "decmbytes", f"{p['title']}: MiB are binary units (mbytes)"
        if "DCGM_FI_DEV_FB_" in exprs:
            assert unit == "mbytes", p["title"]  # dcgm-exporter reports framebuffer memory in MiB
        if "_seconds_bucket" in exprs or "_duration_seconds" in exprs:
            assert unit == "s", p["title"]


def test_the_dashboard_is_importable_grafana_json() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"]
    assert data["title"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for p in data["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"


def test_every_metric_the_alert_rules_use_is_exported(tmp_path: Path) -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(e) for e in exprs))
    exported = exported_names(tmp_path) | SYNTHETIC
    assert used <= exported, sorted(used - exported)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_the_prometheus_examples_pass_promtool() -> None:
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        r = subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
