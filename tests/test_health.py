"""The pure health state machine, driven with a fake clock; assertions on transition sequences."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.core.health import (
    Action,
    HealthConfig,
    LogFindings,
    ProbeResult,
    Record,
    after_action,
    backoff_delay,
    decide,
)
from orchestrator.core.readiness import InstanceStatus, readiness
from orchestrator.core.states import InstanceState as S
from orchestrator.core.states import ProcessInfo
from orchestrator.core.states import ProcessState as P

CFG = HealthConfig(startup_timeout=600, unhealthy_threshold=3)
OK = ProbeResult(ok=True, tcp=True, status_code=200, device="cpu", queue_pending=2, queue_running=1)
TIMEOUT = ProbeResult(ok=False, tcp=True, error="no answer within 3s")
REFUSED = ProbeResult(ok=False, error="port 8188 not open (Connection refused)")


def proc(
    state: P = P.RUNNING, pid: int = 100, start: float = 1000.0, now: float = 1000.0, **kw: object
) -> ProcessInfo:
    fields = {"exitstatus": 0, "spawnerr": "", "description": ""}
    fields.update(kw)
    return ProcessInfo(name="comfyui_gpu0", state=state, pid=pid if state in {P.RUNNING, P.STARTING} else 0,
                       start=start, now=now, **fields)  # type: ignore[arg-type]


class Run:
    """Feeds the state machine and keeps every transition, action and event, like the monitor."""

    def __init__(self, cfg: HealthConfig = CFG, now: float = 0.0) -> None:
        self.cfg = cfg
        self.now = now
        self.rec = Record.initial(now)
        self.transitions: list[tuple[S, S]] = []
        self.reasons: list[str] = []
        self.actions: list[tuple[float, Action]] = []
        self.events: list[str] = []

    def step(
        self, p: ProcessInfo | None, probe: ProbeResult | None, dt: float = 5.0, **kw: str
    ) -> list[Action]:
        self.now += dt
        d = decide(self.rec, p, probe, self.now, self.cfg, **kw)
        self._take(d)
        return list(d.actions)

    def done(self, action: Action, error: str = "") -> None:
        self._take(after_action(self.rec, action, error, self.now))

    def _take(self, d) -> None:  # type: ignore[no-untyped-def]
        self.rec = d.record
        self.transitions += [(t.old, t.new) for t in d.transitions]
        self.reasons += [t.reason for t in d.transitions]
        self.actions += [(self.now, a) for a in d.actions]
        self.events += list(d.events)

    @property
    def state(self) -> S:
        return self.rec.state


def test_an_instance_is_ready_at_its_first_good_probe() -> None:
    run = Run()
    run.step(proc(P.STARTING), REFUSED)
    assert run.state is S.STARTING
    run.step(proc(), OK)
    assert run.transitions == [(S.STARTING, S.READY)]
    assert "first good probe" in run.reasons[0]
    assert (run.rec.queue_pending, run.rec.queue_running) == (2, 1)


def test_failed_probes_during_a_slow_start_do_not_restart_it_before_the_startup_timeout() -> None:
    run = Run()
    for _ in range(110):  # 550 s of refused connections, as during a cold start with many nodes
        assert run.step(proc(), REFUSED) == []
    assert run.state is S.STARTING
    assert "starting for" in run.rec.reason
    run.step(proc(), OK)
    assert run.transitions == [(S.STARTING, S.READY)]


def test_a_start_past_the_startup_timeout_is_restarted_with_the_reason() -> None:
    run = Run(HealthConfig(startup_timeout=30, unhealthy_threshold=3))
    for _ in range(5):
        run.step(proc(), REFUSED)
    assert run.state is S.STARTING
    actions = run.step(proc(), REFUSED, dt=10)
    assert actions == [Action.RESTART]
    assert run.transitions == [(S.STARTING, S.UNHEALTHY), (S.UNHEALTHY, S.RESTARTING)]
    assert "STARTUP_TIMEOUT" in run.reasons[0]


def test_a_start_whose_port_is_open_but_never_answers_is_a_hang_not_a_slow_start() -> None:
    run = Run()
    run.step(proc(), REFUSED, dt=0.5)
    run.step(proc(), TIMEOUT, dt=0.5)
    run.step(proc(), REFUSED, dt=0.5)  # a refused connection in between starts the count again
    run.step(proc(), TIMEOUT, dt=0.5)
    run.step(proc(), TIMEOUT, dt=0.5)
    assert run.actions == []
    assert run.step(proc(), TIMEOUT, dt=0.5) == [Action.RESTART]
    assert run.transitions == [(S.STARTING, S.UNHEALTHY), (S.UNHEALTHY, S.RESTARTING)]
    assert "port open but not answering" in run.reasons[0]


def test_a_hung_ready_instance_goes_unhealthy_after_k_failures_then_restarts_and_is_ready_again() -> None:
    run = Run()
    run.step(proc(), OK)
    run.step(proc(), TIMEOUT)
    assert run.state is S.SUSPECT  # at the first failed probe: no new jobs, not counted ready
    run.step(proc(), TIMEOUT)
    assert run.state is S.SUSPECT
    assert run.actions == []  # restarted only at the threshold
    assert "2 failed probe(s)" in run.rec.reason
    assert run.step(proc(), TIMEOUT) == [Action.RESTART]
    assert run.state is S.RESTARTING
    assert "3 consecutive failed probes" in run.rec.reason
    assert "no answer within 3s" in run.rec.reason
    run.done(Action.RESTART)
    run.step(proc(P.STARTING, pid=200, start=2000), REFUSED, dt=0.5)
    run.step(proc(pid=200, start=2000), OK, dt=0.5)
    assert run.transitions == [
        (S.STARTING, S.READY),
        (S.READY, S.SUSPECT),
        (S.SUSPECT, S.UNHEALTHY),
        (S.UNHEALTHY, S.RESTARTING),
        (S.RESTARTING, S.STARTING),
        (S.STARTING, S.READY),
    ]
    assert run.rec.restarts == 1


def test_a_good_probe_resets_the_failure_count() -> None:
    run = Run()
    run.step(proc(), OK)
    for _ in range(10):
        run.step(proc(), TIMEOUT)
        run.step(proc(), TIMEOUT)
        run.step(proc(), OK)
    assert run.actions == []
    assert run.state is S.READY
    assert run.rec.reason == "answering again after 2 failed probe(s)"
    assert run.transitions.count((S.READY, S.SUSPECT)) == 10
    assert run.transitions.count((S.SUSPECT, S.READY)) == 10
    run.step(proc(), OK)
    assert run.rec.reason == "answering"


def test_a_crash_that_supervisord_restarted_is_counted_once_and_goes_through_starting() -> None:
    run = Run()
    run.step(proc(pid=100, start=1000), OK)
    run.step(proc(pid=101, start=1010), REFUSED, dt=0.5)
    assert run.transitions[-1] == (S.READY, S.STARTING)
    assert run.rec.restarts == 1
    assert run.events
    assert "outside the monitor" in run.events[0]
    run.step(proc(pid=101, start=1010), OK, dt=0.5)
    run.step(proc(pid=101, start=1010), OK)
    assert run.rec.restarts == 1
    assert run.state is S.READY
    assert run.actions == []


def test_a_restart_by_the_monitor_is_counted_once() -> None:
    run = Run()
    run.step(proc(), OK)
    run.step(proc(), OK, restart_requested="restart requested over HTTP")
    assert run.actions[-1][1] is Action.RESTART
    assert run.state is S.RESTARTING
    run.done(Action.RESTART)
    for _ in range(3):
        run.step(proc(pid=555, start=3000), OK, dt=0.5)
    assert run.rec.restarts == 1
    assert run.events == []


def test_the_first_process_seen_is_not_a_restart() -> None:
    run = Run()
    run.step(proc(pid=42, start=5), OK)
    assert run.rec.restarts == 0
    assert run.rec.seen


def test_a_long_running_process_found_hung_when_the_monitor_starts_is_restarted_after_k_failures() -> None:
    run = Run()
    old = proc(pid=7, start=1000.0, now=1000.0 + 86400)  # up for a day
    run.step(old, TIMEOUT, dt=0.5)
    run.step(old, TIMEOUT, dt=0.5)
    assert run.actions == []
    assert run.step(old, TIMEOUT, dt=0.5) == [Action.RESTART]


def test_fatal_is_retried_with_exponential_backoff_capped_at_five_minutes() -> None:
    run = Run()
    run.step(proc(), OK)
    for _ in range(4000):
        actions = run.step(proc(P.FATAL, spawnerr="can't find command"), None, dt=1.0)
        if actions:
            run.done(Action.START)
    starts = [t for t, a in run.actions if a is Action.START]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[:5] == [10, 20, 40, 80, 160]
    assert max(gaps) == 300
    assert gaps[-1] == 300
    assert run.state is S.FATAL
    assert "supervisord gave up (can't find command)" in run.rec.reason


def test_fatal_after_a_start_attempt_is_retried_later_and_a_good_start_resets_the_backoff() -> None:
    run = Run()
    run.step(proc(), OK)
    run.step(proc(P.FATAL), None, dt=1)
    assert "next start in 5.0s" in run.rec.reason
    assert run.step(proc(P.FATAL), None, dt=5) == [Action.START]
    run.done(Action.START)
    run.step(proc(P.STARTING, pid=9, start=9), REFUSED, dt=0.5)
    assert run.state is S.STARTING
    run.step(proc(P.BACKOFF), None, dt=0.5)
    assert run.state is S.BACKOFF
    run.step(proc(P.FATAL), None, dt=0.5)
    assert "next start in 10s" in run.rec.reason
    run.step(proc(P.FATAL), None, dt=10)
    run.done(Action.START)
    run.step(proc(pid=10, start=20), OK, dt=0.5)
    assert run.state is S.READY
    assert run.rec.attempts == 0
    assert (S.FATAL, S.STARTING) in run.transitions


def test_supervisord_backoff_is_reported_without_acting() -> None:
    run = Run()
    run.step(proc(), OK)
    assert run.step(proc(P.BACKOFF, spawnerr="Exited too quickly"), None) == []
    assert run.state is S.BACKOFF
    assert "Exited too quickly" in run.rec.reason


def test_an_exited_program_that_supervisord_does_not_restart_is_started_with_backoff() -> None:
    run = Run()
    run.step(proc(), OK)
    assert run.step(proc(P.EXITED, exitstatus=0), None, dt=1) == []
    assert run.state is S.BACKOFF
    assert run.step(proc(P.EXITED), None, dt=5) == [Action.START]


def test_an_instance_stopped_by_the_operator_is_left_stopped_until_started() -> None:
    run = Run()
    run.step(proc(), OK)
    for _ in range(100):
        assert run.step(proc(P.STOPPED), None) == []
    assert run.state is S.STOPPED
    run.step(proc(P.STARTING, pid=300, start=5000), REFUSED, dt=0.5)
    run.step(proc(pid=300, start=5000), OK, dt=0.5)
    assert run.transitions == [(S.STARTING, S.READY), (S.READY, S.STOPPED), (S.STOPPED, S.STARTING),
                               (S.STARTING, S.READY)]


def test_a_program_supervisord_does_not_know_is_stopped_with_the_reason() -> None:
    run = Run()
    why = "no program comfyui_gpu0 in supervisord: run `orchestrator up` to apply the plan"
    assert run.step(proc(P.UNKNOWN, description=why), None) == []
    assert run.state is S.STOPPED
    assert run.rec.reason == why


def test_a_restart_whose_start_failed_is_started_again() -> None:
    run = Run()
    run.step(proc(), OK)
    run.step(proc(), OK, restart_requested="requested")
    run.done(Action.RESTART, error="supervisord did not answer")
    assert run.state is S.RESTARTING
    assert "restart failed" in run.rec.reason
    assert run.step(proc(P.STOPPED), None, dt=0.5) == [Action.START]
    assert run.state is S.STARTING


def test_a_wrong_device_is_unhealthy_with_that_reason_and_repeated_restarts_back_off() -> None:
    why = "expected NVIDIA H100 80GB HBM3 (GPU 0), /system_stats reports 'cuda:0 NVIDIA A10'"
    wrong = ProbeResult(ok=False, tcp=True, status_code=200, device="cuda:0 NVIDIA A10", device_error=why)
    run = Run()
    assert run.step(proc(), wrong, dt=1) == [Action.RESTART]
    assert run.transitions == [(S.STARTING, S.UNHEALTHY), (S.UNHEALTHY, S.RESTARTING)]
    assert "wrong device" in run.reasons[0]
    assert "NVIDIA A10" in run.reasons[0]
    run.done(Action.RESTART)
    run.step(proc(pid=2, start=2), wrong, dt=1)
    assert run.state is S.UNHEALTHY
    assert "(backoff)" in run.rec.reason
    assert len(run.actions) == 1
    run.step(proc(pid=2, start=2), wrong, dt=5)
    assert len(run.actions) == 2


def test_an_out_of_memory_error_frees_memory_and_a_repeat_within_the_window_restarts() -> None:
    tb = "torch.OutOfMemoryError: CUDA out of memory."
    oom = dataclasses.replace(OK, logs=LogFindings(oom=2, traceback=tb))
    run = Run()
    run.step(proc(), OK)
    assert run.step(proc(), oom) == [Action.FREE]
    assert run.state is S.READY
    assert "freeing memory" in run.events[-1]
    run.step(proc(), OK, dt=400)
    assert run.step(proc(), oom) == [Action.FREE]  # the first one is outside the 300 s window
    assert run.step(proc(), oom, dt=60) == [Action.RESTART]
    assert run.state is S.RESTARTING
    assert "out-of-memory" in run.rec.reason


def test_import_failures_name_the_nodes_and_a_new_start_replaces_the_list() -> None:
    run = Run()
    logs = LogFindings(import_failed=("BrokenNode", "Other"), import_block=True)
    run.step(proc(), dataclasses.replace(REFUSED, logs=logs))
    assert run.rec.failed_nodes == ("BrokenNode", "Other")
    run.step(proc(), dataclasses.replace(OK, logs=LogFindings(import_failed=("Late",))))
    assert run.rec.failed_nodes == ("BrokenNode", "Late", "Other")
    run.step(proc(pid=5, start=5), dataclasses.replace(REFUSED, logs=LogFindings(import_block=True)), dt=0.5)
    assert run.rec.failed_nodes == ()


def test_a_startup_traceback_is_part_of_the_starting_reason() -> None:
    run = Run()
    logs = LogFindings(traceback="ModuleNotFoundError: No module named 'cv2'")
    run.step(proc(), dataclasses.replace(REFUSED, logs=logs))
    assert "ModuleNotFoundError" in run.rec.reason


def test_without_supervisord_nothing_is_restarted() -> None:
    run = Run()
    run.step(proc(), OK)
    for _ in range(10):
        assert run.step(None, TIMEOUT) == []
    assert run.state is S.UNHEALTHY
    assert "supervisord did not answer" in run.rec.reason


def test_a_hung_report_from_a_job_restarts_at_once() -> None:
    run = Run()
    run.step(proc(), OK)
    assert run.step(proc(), OK, hung="prompt abc past its 600s deadline") == [Action.RESTART]
    assert run.transitions[-2:] == [(S.READY, S.UNHEALTHY), (S.UNHEALTHY, S.RESTARTING)]
    assert "reported hung: prompt abc" in run.rec.reason


def test_backoff_delay_doubles_and_is_capped() -> None:
    assert [backoff_delay(i, 5, 300) for i in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert backoff_delay(10_000, 5, 300) == 300


def _status(gpu: int, state: S, pending: int = 0) -> InstanceStatus:
    return InstanceStatus(
        gpu=gpu, name=f"comfyui_gpu{gpu}", port=8188 + gpu, state=state, reason=f"why {gpu}", since=0.0,
        process_state="RUNNING", pid=1, start_time=1.0, uptime=1.0, restarts=0, failed_custom_nodes=(),
        queue_pending=pending, queue_running=0, last_probe=None, probe_duration=None, device="cpu",
    )


def test_readiness_needs_every_instance_by_default_and_names_the_others() -> None:
    r = readiness([_status(0, S.READY), _status(1, S.UNHEALTHY)], None)
    assert not r.ready
    assert r.required == 2
    assert r.ready_count == 1
    assert "comfyui_gpu1 UNHEALTHY: why 1" in r.reason
    assert readiness([_status(0, S.READY), _status(1, S.UNHEALTHY)], 1).ready
    assert readiness([_status(0, S.READY)], 4).ready  # more than planned means all of them


def test_readiness_is_false_while_supervisord_does_not_answer() -> None:
    r = readiness([_status(0, S.READY), _status(1, S.READY)], None, supervisord_down="supervisord does not answer")
    assert not r.ready
    assert r.ready_count == 2
    assert r.reason == "supervisord does not answer"


@pytest.mark.parametrize(
    ("pending", "inflight", "ready"), [(8, {}, False), (7, {}, True), (0, {0: 8, 1: 9}, False)]
)
def test_readiness_with_saturation_is_false_while_every_ready_instance_is_full(
    pending: int, inflight: dict[int, int], ready: bool
) -> None:
    statuses = [_status(0, S.READY, pending), _status(1, S.READY, pending)]
    r = readiness(statuses, None, saturation=True, max_queue_depth=8, inflight=inflight)
    assert r.ready is ready
    assert readiness(statuses, None, saturation=False, max_queue_depth=8, inflight=inflight).ready


def test_an_operator_stop_and_start_is_not_counted_as_a_restart_but_a_crash_is() -> None:
    run = Run()
    run.step(proc(), OK)
    run.step(proc(P.STOPPED), None)  # orchestrator stop 0
    run.step(proc(P.STARTING, pid=300, start=5000), REFUSED, dt=0.5)  # orchestrator start 0
    run.step(proc(pid=300, start=5000), OK, dt=0.5)
    assert run.state is S.READY
    assert run.rec.restarts == 0
    assert run.events == []  # not reported as a restart outside the monitor either
    run.step(proc(pid=301, start=6000), REFUSED, dt=0.5)  # a crash that supervisord restarted
    assert run.rec.restarts == 1
    assert any("outside the monitor" in e for e in run.events)


def test_a_suspect_instance_is_restarted_by_a_hung_report_like_a_ready_one() -> None:
    run = Run()
    run.step(proc(), OK)
    run.step(proc(), TIMEOUT)
    assert run.state is S.SUSPECT
    assert run.step(proc(), TIMEOUT, hung="job past its deadline; interrupt did not take") == [Action.RESTART]
    assert run.state is S.RESTARTING
