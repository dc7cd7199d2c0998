"""A SIGSTOPped or hung instance is restarted within seconds, not after PROBE_INTERVAL x threshold."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
import requests
from support import Machine, wait_until

from orchestrator.monitor.prober import process_stopped


def test_process_stopped_reads_the_state_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not process_stopped(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        assert wait_until(lambda: process_stopped(child.pid), 5, 0.02)
        os.kill(child.pid, signal.SIGCONT)
        assert wait_until(lambda: not process_stopped(child.pid), 5, 0.02)
    finally:
        child.kill()
        child.wait()
    assert not process_stopped(child.pid)  # gone
    assert not process_stopped(0)
    assert not process_stopped(-1)


@pytest.mark.integration
def test_a_sigstopped_instance_is_restarted_without_waiting_for_probe_timeouts(
    machine: Callable[..., Machine],
) -> None:
    # Probes so slow that counting timed-out probes could never restart it within the deadline
    # below (3 x (300 s + 120 s)): only seeing the stopped process can.
    m = machine(1, PROBE_INTERVAL="300", PROBE_TIMEOUT="120", UNHEALTHY_THRESHOLD="3")
    m.up()

    def instance() -> dict:  # type: ignore[type-arg]
        try:
            return dict(requests.get(f"{m.monitor_url}/instances/0", timeout=2).json())
        except (requests.RequestException, ValueError):
            return {}

    assert wait_until(lambda: instance().get("state") == "READY", 60, 0.1)
    old = instance()["pid"]
    os.kill(old, signal.SIGSTOP)
    try:
        assert wait_until(lambda: instance().get("pid") not in (None, old) and instance().get("state") == "READY",
                          90, 0.1), instance()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
    assert instance()["restarts"] == 1
