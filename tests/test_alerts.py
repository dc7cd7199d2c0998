"""The shipped Prometheus alerts: `promtool test rules` unit tests exist for every alert and pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
TESTS = PROMETHEUS / "tests" / "alerts_test.yml"


def _alerts() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = _alerts()
    assert alerts, "no alerts in alerts.yml"
    assert alerts <= fires, f"alerts no test fires: {sorted(alerts - fires)}"
    assert alerts <= quiet, f"alerts no test shows quiet: {sorted(alerts - quiet)}"
    assert (fires | quiet) <= alerts, f"tests of alerts that do not exist: {sorted((fires | quiet) - alerts)}"


def test_the_alerts_cover_crash_loops_operator_stops_gpus_jobs_downloads_and_a_missing_monitor() -> None:
    required = {
        "ComfyUIInstanceFatal", "ComfyUIInstanceStoppedByOperator", "GPULost", "ComfyUIJobErrorRate",
        "ComfyUIJobsRejected", "ComfyUIModelDownloadsFailed", "ComfyUIMonitorAbsent",
    }
    assert required <= _alerts(), sorted(required - _alerts())


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_promtool_test_rules_passes() -> None:
    r = subprocess.run(
        ["promtool", "test", "rules", str(TESTS.relative_to(PROMETHEUS))],
        cwd=PROMETHEUS, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
