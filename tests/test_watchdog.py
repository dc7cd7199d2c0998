"""Watch the watchers: the monitor's heartbeat, `health --live` on a stale one, and the
supervisord event listener that restarts a stuck (SIGSTOPped) monitor."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Machine, wait_for

from orchestrator.core.layout import Layout
from orchestrator.core.settings import load_settings
from orchestrator.core.states import ProcessInfo, ProcessState
from orchestrator.machine.supervisor import Supervisor
from orchestrator.machine.watchdog import (
    STARTUP_GRACE,
    Heartbeat,
    heartbeat_path,
    listen,
    read_heartbeat,
    stale_after,
    stuck_reason,
)
from orchestrator.monitor.healthcheck import check_health


def _monitor(uptime: float, pid: int = 42, state: ProcessState = ProcessState.RUNNING) -> ProcessInfo:
    return ProcessInfo("monitor", state, pid, 1000.0, 1000.0 + uptime, 0, "", "")


def test_a_running_monitor_with_a_stale_heartbeat_is_stuck_and_nothing_else_is() -> None:
    bound = stale_after(0.5, 1.0)
    assert bound == 8.0
    now = 5000.0
    assert stuck_reason(_monitor(100), (42, now - 1), now, bound) == ""
    assert "heartbeat is 20s old" in stuck_reason(_monitor(100), (42, now - 20), now, bound)
    assert stuck_reason(_monitor(5), (42, now - 20), now, bound) == ""  # just started
    for state in (ProcessState.BACKOFF, ProcessState.STARTING, ProcessState.STOPPED):
        assert stuck_reason(_monitor(100, state=state), (42, now - 20), now, bound) == ""  # supervisord's business
    assert stuck_reason(None, None, now, bound) == ""
    # No beat from this pid yet: a grace for a slow start, then stuck.
    assert stuck_reason(_monitor(bound + 1), (7, now - 1), now, bound) == ""
    assert "has not written a heartbeat" in stuck_reason(_monitor(bound + STARTUP_GRACE + 1), None, now, bound)


def test_the_heartbeat_holds_the_pid_and_every_beat_moves_its_mtime(tmp_path: Path) -> None:
    path = tmp_path / "monitor.heartbeat"
    beat = Heartbeat(path, pid=1234)
    beat.beat()
    assert read_heartbeat(path) == (1234, path.stat().st_mtime)
    os.utime(path, (1, 1))
    beat.beat()
    got = read_heartbeat(path)
    assert got is not None
    assert got[1] > 1
    path.unlink()
    beat.beat()  # removed under it: written again next beat, never raises
    beat.beat()
    assert read_heartbeat(path) is not None
    Heartbeat(tmp_path / "missing" / "hb").beat()  # no folder: no exception


def test_the_listener_speaks_supervisords_protocol_and_acts_on_ticks_only() -> None:
    payload = "ver:3.0 server:supervisor serial:1 pool:watchdog poolserial:1 eventname:TICK_5 len:15\n"
    other = "ver:3.0 server:supervisor serial:2 pool:watchdog poolserial:2 eventname:PROCESS_STATE_RUNNING len:4\n"
    stdin = io.StringIO(payload + "when:123456789" + "x" + other + "abcd")
    stdout = io.StringIO()
    ticks: list[int] = []
    listen(stdin, stdout, lambda: ticks.append(1))
    assert ticks == [1]
    assert stdout.getvalue() == "READY\nRESULT 2\nOKREADY\nRESULT 2\nOKREADY\n"

    def boom() -> None:
        raise RuntimeError("one failed round")

    stdout = io.StringIO()
    listen(io.StringIO(payload + "when:123456789x"), stdout, boom)  # logged; the listener goes on
    assert stdout.getvalue().count("RESULT 2\nOK") == 1


def test_health_live_fails_on_a_stale_heartbeat_even_before_asking_the_port(tmp_path: Path) -> None:
    settings = load_settings({"ROOT": str(tmp_path), "PROBE_INTERVAL": "1", "PROBE_TIMEOUT": "1", "ORCHESTRATOR_PORT": "9"})
    path = heartbeat_path(Layout(tmp_path))
    path.parent.mkdir(parents=True)
    Heartbeat(path).beat()
    os.utime(path, (time.time() - 60, time.time() - 60))
    result = check_health(settings, live=True)
    assert not result.ok
    assert "heartbeat" in result.message
    assert "60s old" in result.message
    Heartbeat(path).beat()  # fresh: the verdict is the port's (nothing listens on port 1)
    result = check_health(settings, live=True)
    assert not result.ok
    assert "not answering" in result.message
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert "not answering" in check_health(settings, live=False).message  # readiness ignores it


@pytest.mark.integration
def test_a_sigstopped_monitor_is_restarted_by_the_watchdog(machine: Callable[..., Machine]) -> None:
    m = machine(1)
    m.up()
    sup = Supervisor(m.layout)
    assert wait_for(lambda: sup.process("watchdog").state == ProcessState.RUNNING, 30, what="watchdog RUNNING")
    assert wait_for(lambda: m.run("health", "--live").returncode == 0, 60, what="monitor alive")
    old = sup.process("monitor").pid
    beat = wait_for(lambda: read_heartbeat(heartbeat_path(m.layout)), 30, what="a heartbeat")
    assert beat[0] == old
    os.kill(old, signal.SIGSTOP)
    try:
        # health --live fails on the stopped monitor (its heartbeat goes stale, its port hangs)
        assert wait_for(lambda: m.run("health", "--live").returncode == 1, 60, what="health --live failing")
        new = wait_for(
            lambda: (p := sup.process("monitor")).state == ProcessState.RUNNING and p.pid not in (0, old) and p.pid,
            90, interval=0.5, what="a fresh monitor",
        )
        assert new != old
        assert wait_for(lambda: m.run("health", "--live").returncode == 0, 60, what="the fresh monitor alive")
        got = read_heartbeat(heartbeat_path(m.layout))
        assert got is not None
        assert got[0] == new
        assert "heartbeat" in (m.root / "logs" / "watchdog.log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
