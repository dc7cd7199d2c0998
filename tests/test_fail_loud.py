"""`up` fails loud: the monitor's start rules are checked first, and a program it started that
crash-loops in supervisord (BACKOFF/FATAL) fails `up` with its name and its log's last lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support import Machine, wait_for

from orchestrator.core.errors import ConfigError, SupervisorError
from orchestrator.core.states import ProcessInfo, ProcessState
from orchestrator.lifecycle.watch import watch_started
from orchestrator.monitor.preflight import check_start


def test_up_refuses_a_public_listen_address_without_a_token_before_starting_anything(
    machine: Callable[..., Machine],
) -> None:
    m = machine(1)
    serve = m.run("serve", ORCHESTRATOR_LISTEN="0.0.0.0")
    r = m.run("up", "--skip-provision", ORCHESTRATOR_LISTEN="0.0.0.0")
    assert r.returncode == serve.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line == serve.stderr.strip().splitlines()[-1]  # the same one line as the monitor's
    assert "ORCHESTRATOR_TOKEN" in line
    assert "Traceback" not in r.stderr
    assert not m.layout.supervisord_conf.exists()  # nothing rendered, nothing started
    assert not m.layout.socket.exists()


def test_up_refuses_an_unusable_gpu_metric_label_like_the_monitor() -> None:
    from orchestrator.core.settings import load_settings

    with pytest.raises(ConfigError, match="GPU_METRICS_HOST_LABEL"):
        check_start(load_settings(env={"GPU_METRICS_HOST_LABEL": "bad-label"}))


def test_up_fails_naming_an_instance_that_crash_loops_and_its_last_log_lines(
    machine: Callable[..., Machine],
) -> None:
    m = machine(1)
    main = m.root / "ComfyUI" / "main.py"
    main.write_text('import sys\nprint("boom: no module named torch", flush=True)\nsys.exit(3)\n' + main.read_text())
    r = m.run("up", "--skip-provision")
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "comfyui_gpu0 is crash-looping" in line
    assert "boom: no module named torch" in line
    assert "Traceback" not in r.stderr


def test_up_succeeds_once_its_programs_have_stayed_up(machine: Callable[..., Machine]) -> None:
    m = machine(1)
    m.up()
    # `up` returned once the instance had stayed up SETTLE_SECONDS as one process: supervisord may
    # not have marked it RUNNING yet (its startsecs is whole seconds), but it is not failing...
    states = {i["name"]: i["state"] for i in m.status()["instances"]}
    assert states in ({"comfyui_gpu0": "RUNNING"}, {"comfyui_gpu0": "STARTING"})
    # ...and it gets there without a restart.
    wait_for(lambda: {i["name"]: (i["state"], i["restarts"]) for i in m.status()["instances"]}
             == {"comfyui_gpu0": ("RUNNING", 0)}, 30, 0.2, "comfyui_gpu0 RUNNING with no restart")


# ---------------------------------------------------------------- watch_started with a fake table
class FakeSupervisor:
    def __init__(self, tables: list[dict[str, ProcessState]], log: str = "") -> None:
        self.tables = tables
        self.log = log

    def processes(self) -> list[ProcessInfo]:
        table = self.tables.pop(0) if len(self.tables) > 1 else self.tables[0]
        return [
            ProcessInfo(n, s, 0, 0.0, 0.0, 1, "", "Exited too quickly" if s == ProcessState.BACKOFF else "")
            for n, s in table.items()
        ]

    def read_log(self, name: str, offset: int, length: int) -> tuple[str, int, bool]:
        return self.log, 0, False


S = ProcessState


def _watch(sup: FakeSupervisor, names: list[str], timeout: float = 5.0) -> None:
    fake: Any = sup
    watch_started(fake, names, timeout=timeout, interval=0.0, redact=lambda s: s.replace("s3cret", "***"))


def test_watch_waits_through_starting_and_accepts_running_and_exited() -> None:
    sup = FakeSupervisor([
        {"a": S.STOPPED, "models": S.STARTING},
        {"a": S.STARTING, "models": S.EXITED},
        {"a": S.RUNNING, "models": S.EXITED},
    ])
    _watch(sup, ["a", "models"])
    assert len(sup.tables) == 1


@pytest.mark.parametrize("state", [S.BACKOFF, S.FATAL])
def test_watch_raises_on_backoff_or_fatal_with_the_log_tail_redacted(state: ProcessState) -> None:
    log = "\n".join(f"line {i}" for i in range(20)) + "\nerror: token s3cret refused\n"
    sup = FakeSupervisor([{"a": S.STARTING, "b": S.RUNNING}, {"a": state, "b": S.RUNNING}], log)
    with pytest.raises(SupervisorError) as info:
        _watch(sup, ["a", "b"])
    msg = str(info.value)
    assert msg.startswith(f"a is crash-looping ({state.name}")
    assert "line 19 | error: token *** refused" in msg
    assert "line 14" not in msg  # only the last lines
    assert "s3cret" not in msg
    assert "\n" not in msg


def test_watch_gives_up_quietly_on_a_program_still_starting_at_its_deadline() -> None:
    sup = FakeSupervisor([{"a": S.STARTING}])
    _watch(sup, ["a"], timeout=0.0)


class OneProcessStarting(FakeSupervisor):
    """One program STARTING as pid 10 (or a new pid on each read when ``crashing``)."""

    def __init__(self, crashing: bool = False) -> None:
        super().__init__([{"a": S.STARTING}])
        self.reads = 0
        self.crashing = crashing

    def processes(self) -> list[ProcessInfo]:
        self.reads += 1
        pid = 10 + self.reads if self.crashing else 10
        return [ProcessInfo("a", S.STARTING, pid, 1000.0, 1000.0, 0, "", "")]


class Clock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_watch_settles_a_process_that_stayed_up_half_a_second_without_waiting_for_startsecs() -> None:
    sup = OneProcessStarting()
    fake: Any = sup
    watch_started(fake, ["a"], timeout=60, interval=0.0, clock=Clock(0.1))
    assert 2 < sup.reads < 10  # not at first sight, and long before the 60 s deadline (0.5 s by our clock)


def test_watch_counts_again_from_a_new_pid() -> None:
    sup = OneProcessStarting(crashing=True)  # restarted on every read: never up for 0.5 s
    fake: Any = sup
    watch_started(fake, ["a"], timeout=3, interval=0.0, clock=Clock(0.1))
    assert sup.reads >= 15  # waited until the deadline instead of settling
