"""`status` in plain text: failed custom nodes with their errors, STATE and HEALTH that never
contradict each other on one row, and an operator's stop + start not counted as a restart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from support import Machine, clean_env, wait_for

from orchestrator.core.layout import Layout
from orchestrator.core.plan import build_plan
from orchestrator.core.settings import load_settings
from orchestrator.lifecycle.status import nodes_section, row_health
from orchestrator.machine.fs import write_json
from orchestrator.machine.gpu import MockBackend
from orchestrator.provision.nodes.report import REPORT_FILE


# ---------------------------------------------------------------- pure
def test_a_program_supervisord_no_longer_runs_is_never_shown_with_a_running_health() -> None:
    ready = {"state": "READY", "reason": "answering", "pid": 100}
    assert row_health("STOPPED", 0, ready) == ("STOPPED", "supervisord reports STOPPED")
    assert row_health("FATAL", 0, ready)[0] == "FATAL"
    assert row_health("EXITED", 0, {**ready, "state": "SUSPECT"})[0] == "BACKOFF"
    assert row_health("STOPPED", 0, {**ready, "state": "RESTARTING"})[0] == "RESTARTING"  # the monitor's own stop
    assert row_health("STOPPED", 0, {**ready, "state": "STOPPED"}) == ("STOPPED", "answering")


def test_a_running_program_the_monitor_has_not_probed_yet_is_starting() -> None:
    ready = {"state": "READY", "reason": "answering", "pid": 100}
    assert row_health("RUNNING", 100, ready) == ("READY", "answering")
    health, reason = row_health("RUNNING", 200, ready)  # a new process since the monitor looked
    assert health == "STARTING"
    assert "process 200 not probed" in reason
    assert row_health("RUNNING", 200, {**ready, "state": "STOPPED", "pid": None})[0] == "STARTING"
    assert row_health("RUNNING", 100, {})[0] is None  # the monitor did not answer: no health


def test_failed_nodes_come_from_the_last_sync_report_with_their_errors() -> None:
    recorded = {"counts": {"failed": 0}, "failed": []}
    report = {"counts": {"failed": 1, "installed": 1}, "nodes": [
        {"name": "good", "status": "ok", "error": ""},
        {"name": "bad", "status": "failed", "error": "pip install -r requirements.txt failed: no torchx"},
    ]}
    section = nodes_section(recorded, report)
    assert section["failed"] == ["bad"]
    assert section["errors"] == {"bad": "pip install -r requirements.txt failed: no torchx"}
    assert nodes_section(recorded, None) == recorded


# ---------------------------------------------------------------- the CLI
def test_status_text_lists_failed_custom_nodes_with_their_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "root"
    env = clean_env(ROOT=str(root), MOCK_GPU="1", NUM_GPUS="1")
    settings = load_settings(env)
    layout = Layout(root)
    layout.state_dir.mkdir(parents=True)
    write_json(layout.plan_file, build_plan(settings, MockBackend(1, 2**30).list_gpus()).to_dict())
    # status.json from an `up --skip-provision` (no nodes section), then a failing `nodes sync`
    write_json(layout.status_file, {"stages": {"detect": 0.1}})
    (layout.state_dir / REPORT_FILE).write_text(json.dumps({"counts": {"failed": 1}, "failed": ["ComfyUI-Broken"],
        "nodes": [{"name": "ComfyUI-Broken", "status": "failed", "error": "custom_script failed (exit 3): boom"}]}))
    r = subprocess.run([sys.executable, "-m", "orchestrator", "status"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "failed custom nodes (1)" in r.stdout
    assert "  ComfyUI-Broken: custom_script failed (exit 3): boom" in r.stdout


def test_an_operator_stop_shows_stopped_at_once_and_a_start_is_not_a_restart(
    machine: Callable[..., Machine],
) -> None:
    m = machine(1)
    m.up()

    def row() -> dict[str, object]:
        return dict(m.status()["instances"][0])

    wait_for(lambda: row()["health"] == "READY", 60, 0.2, "READY")
    m.run("stop", "0", check=True)
    first = row()  # right after the stop: the monitor may not have polled supervisord yet
    assert first["state"] == "STOPPED"
    assert first["health"] == "STOPPED", first
    m.run("start", "0", check=True)
    after = wait_for(lambda: (r := row())["health"] == "READY" and r, 60, 0.2, "READY after the start")
    assert after["restarts"] == 0, after
