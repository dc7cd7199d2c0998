"""The monitor's health model: one pure state machine (its views: :mod:`orchestrator.core.readiness`).

:func:`decide` combines the previous :class:`Record` of an instance, supervisord's
:class:`~orchestrator.core.states.ProcessInfo` (``None`` when supervisord did not answer), the latest
:class:`ProbeResult` and the time into a :class:`Decision`: the new record, the actions the
monitor must take, and every state transition with its reason. Nothing here does I/O or reads a
clock, so tests feed it a fake clock and assert on the sequence of transitions.

Instance states (DESIGN.md)::

                                   ┌─ a failed probe ─▶ SUSPECT (no new jobs) ─ good probe ─▶ READY
    STARTING ──first good probe──▶ READY ──k failed probes / repeated OOM / hung──▶ UNHEALTHY
       ▲  ├──STARTUP_TIMEOUT─────────────────────────────────────────────────────▶ UNHEALTHY
       │  └──port open but k probes unanswered, or wrong device─────────────────▶ UNHEALTHY
       │                                                                   restart │ (backoff
       └──── new process (pid/start changed) ◀──── RESTARTING ◀────────────────────┘  if repeated)
    supervisord BACKOFF → BACKOFF · EXITED → BACKOFF, started again with capped backoff ·
    FATAL → FATAL, started again with capped backoff (never a silent dead GPU) ·
    STOPPED (by an operator) → STOPPED · unknown to supervisord → STOPPED

A single OOM error is answered with ``POST /free``; a crash that supervisord restarted is
noticed through the new pid and counted once (an operator's stop + start is not counted).
"""

from __future__ import annotations

import dataclasses
import enum

from orchestrator.core.states import InstanceState, ProcessInfo, ProcessState

PROBED_STATES = frozenset({ProcessState.STARTING, ProcessState.RUNNING})  # the process exists: probe it
# States in which a new process is expected (not worth an event of its own).
_EXPECTING_NEW_PROCESS = frozenset({InstanceState.RESTARTING, InstanceState.STARTING, InstanceState.FATAL,
                                    InstanceState.BACKOFF})
_WAITING = "waiting for the first good probe"
_HUNG_ACTS_ON = frozenset({InstanceState.READY, InstanceState.SUSPECT, InstanceState.STARTING, InstanceState.UNHEALTHY})


class Action(enum.Enum):
    """What the monitor does for a decision, through supervisord or the instance's API."""

    RESTART = "restart"  # stop the process group (waiting for it), then start
    START = "start"  # start a program supervisord gave up on (FATAL/EXITED)
    FREE = "free"  # POST /free: unload models and free memory after an out-of-memory error


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """The knobs of the state machine (seconds)."""

    startup_timeout: float = 600.0
    unhealthy_threshold: int = 3
    backoff_base: float = 5.0  # first retry of a FATAL program / repeated restart
    backoff_cap: float = 300.0  # never wait longer than 5 minutes between retries
    oom_window: float = 300.0
    oom_restart_count: int = 2  # this many out-of-memory events within the window → restart


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: base, 2·base, 4·base, … capped at ``cap`` (attempt counts from 0)."""
    return float(min(cap, base * (2 ** min(max(0, attempt), 30))))


@dataclasses.dataclass(frozen=True)
class LogFindings:
    """What the new log lines since the last probe contained."""

    oom: int = 0  # lines reporting an out-of-memory error
    import_failed: tuple[str, ...] = ()  # custom nodes named by `(IMPORT FAILED)` lines
    import_block: bool = False  # an "Import times for custom nodes:" block started: the list is complete
    traceback: str = ""  # the exception line of the last traceback, "" if none
    lines: int = 0


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """One probe of one instance. ``ok`` means /system_stats answered 200 with the planned device."""

    ok: bool
    error: str = ""  # why the probe failed ("" when ok)
    device_error: str = ""  # the instance answered but runs on the wrong device
    tcp: bool = False
    status_code: int | None = None
    duration: float = 0.0  # seconds
    queue_pending: int | None = None
    queue_running: int | None = None
    device: str | None = None  # the device name /system_stats reported
    comfyui_version: str | None = None  # system.comfyui_version from /system_stats
    logs: LogFindings = dataclasses.field(default_factory=LogFindings)


@dataclasses.dataclass(frozen=True)
class Record:
    """Everything the state machine remembers about one instance. ``now`` values are monotonic."""

    state: InstanceState = InstanceState.STARTING
    reason: str = "waiting for the first probe"
    since: float = 0.0  # when the current state was entered
    seen: bool = False  # a process of this program has been observed at least once
    pid: int = 0  # last observed process (never reset to 0, so a new one is recognised)
    started: float = 0.0  # supervisord's start time (epoch) of that process
    starting_since: float = 0.0  # when the current start began (startup timeout)
    failures: int = 0  # consecutive failed probes
    bound_failures: int = 0  # consecutive failed probes while starting with the port already open
    last_error: str = ""
    restarts: int = 0  # new processes observed after the first one (crashes and restarts alike)
    attempts: int = 0  # monitor restarts/starts since the instance was last READY (backoff)
    retry_at: float = 0.0  # earliest time of the next monitor restart/start
    oom_events: tuple[float, ...] = ()
    failed_nodes: tuple[str, ...] = ()
    startup_error: str = ""  # last traceback seen while starting
    last_probe: float | None = None
    probe_duration: float | None = None
    queue_pending: int | None = None
    queue_running: int | None = None
    device: str | None = None
    comfyui_version: str | None = None  # what the running process reports (/system_stats)

    @classmethod
    def initial(cls, now: float) -> Record:
        return cls(since=now, starting_since=now)


@dataclasses.dataclass(frozen=True)
class Transition:
    old: InstanceState
    new: InstanceState
    reason: str


@dataclasses.dataclass(frozen=True)
class Decision:
    record: Record
    actions: tuple[Action, ...] = ()
    transitions: tuple[Transition, ...] = ()
    events: tuple[str, ...] = ()  # notable things that did not change the state (crash recovered, OOM)


class _Builder:
    """Collects the changes of one decision; keeps :func:`decide` readable."""

    def __init__(self, rec: Record, now: float) -> None:
        self.rec = rec
        self.now = now
        self.actions: list[Action] = []
        self.transitions: list[Transition] = []
        self.events: list[str] = []

    def update(self, **changes: object) -> None:
        self.rec = dataclasses.replace(self.rec, **changes)  # type: ignore[arg-type]

    def change_state(self, new: InstanceState, reason: str) -> None:
        """The one place a state changes: records the edge and its reason."""
        old = self.rec.state
        if old is not new:
            self.transitions.append(Transition(old, new, reason))
            self.update(state=new, since=self.now)
        self.update(reason=reason)

    def decision(self) -> Decision:
        return Decision(self.rec, tuple(self.actions), tuple(self.transitions), tuple(self.events))


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def _restart(b: _Builder, cfg: HealthConfig, cause: str, *, forced: bool = False) -> None:
    """UNHEALTHY → RESTARTING now, or stay UNHEALTHY until the backoff delay has passed."""
    # Repeated restarts without READY in between back off: a broken instance never loops tightly.
    if not forced and b.rec.attempts > 0 and b.now < b.rec.retry_at:
        wait = _fmt(b.rec.retry_at - b.now)
        b.change_state(InstanceState.UNHEALTHY, f"{cause}; restart in {wait} (backoff)")
        return
    b.change_state(InstanceState.UNHEALTHY, cause)
    delay = backoff_delay(b.rec.attempts, cfg.backoff_base, cfg.backoff_cap)
    b.update(attempts=b.rec.attempts + 1, retry_at=b.now + delay, failures=0, bound_failures=0, oom_events=())
    b.actions.append(Action.RESTART)
    # UNHEALTHY -> RESTARTING
    b.change_state(InstanceState.RESTARTING, f"restarting: {cause}")


def _retry_start(b: _Builder, cfg: HealthConfig, state: InstanceState, cause: str) -> None:
    """FATAL/EXITED: start again with exponential backoff, never leaving a GPU silently dead."""
    if b.rec.state is not state:
        # entering FATAL/BACKOFF: schedule the next attempt
        b.update(retry_at=b.now + backoff_delay(b.rec.attempts, cfg.backoff_base, cfg.backoff_cap))
    if b.now < b.rec.retry_at:
        b.change_state(state, f"{cause}; next start in {_fmt(b.rec.retry_at - b.now)}")
        return
    b.actions.append(Action.START)
    delay = backoff_delay(b.rec.attempts + 1, cfg.backoff_base, cfg.backoff_cap)
    b.update(attempts=b.rec.attempts + 1, retry_at=b.now + delay)
    b.change_state(state, f"{cause}; starting it again (attempt {b.rec.attempts})")


def _apply_logs(b: _Builder, probe: ProbeResult | None) -> None:
    """What the log lines said: failed custom nodes, the traceback of a failing start."""
    logs = probe.logs if probe is not None else LogFindings()
    if logs.import_block:
        b.update(failed_nodes=tuple(sorted(set(logs.import_failed))))
    elif logs.import_failed:
        b.update(failed_nodes=tuple(sorted(set(b.rec.failed_nodes) | set(logs.import_failed))))
    if logs.traceback and b.rec.state is InstanceState.STARTING:
        b.update(startup_error=logs.traceback)


def _new_process(b: _Builder, proc: ProcessInfo) -> None:
    """Track the process identity (pid + start time); a new one is a restart, counted once."""
    if not b.rec.seen:
        b.update(seen=True, pid=proc.pid, started=proc.start)
        if b.rec.state is InstanceState.STARTING:
            # First sight (the monitor may have just started): the start began when supervisord started it.
            uptime = max(0.0, proc.now - proc.start) if proc.start else 0.0
            b.update(starting_since=b.now - uptime)
        return
    if (proc.pid, proc.start) == (b.rec.pid, b.rec.started):
        return
    was = b.rec.state
    counted = 0 if was is InstanceState.STOPPED else 1  # an operator's stop + start is no restart
    b.update(
        pid=proc.pid, started=proc.start, restarts=b.rec.restarts + counted, starting_since=b.now,
        failures=0, bound_failures=0, startup_error="", failed_nodes=(), oom_events=(),
    )
    if was not in _EXPECTING_NEW_PROCESS and was is not InstanceState.STOPPED:
        b.events.append(f"process restarted outside the monitor (new pid {proc.pid}, was {was.value})")
    # any state -> STARTING
    b.change_state(InstanceState.STARTING, f"new process (pid {proc.pid}): {_WAITING}")


def _probe_running(b: _Builder, cfg: HealthConfig, probe: ProbeResult | None, proc: ProcessInfo | None) -> None:
    """A probe of a running process (or of one supervisord did not report: then never act)."""
    rec = b.rec
    if probe is None:
        return
    b.update(
        last_probe=b.now, probe_duration=probe.duration, queue_pending=probe.queue_pending,
        queue_running=probe.queue_running, device=probe.device or rec.device,
        comfyui_version=probe.comfyui_version or rec.comfyui_version,
    )
    _apply_logs(b, probe)
    can_act = proc is not None  # never act on a process supervisord did not report

    if probe.logs.oom and can_act and rec.state is InstanceState.READY:
        _oom(b, cfg)
        if b.rec.state is not InstanceState.READY:
            return

    if probe.ok:
        b.update(failures=0, bound_failures=0, last_error="")
        if rec.state is InstanceState.SUSPECT:
            b.change_state(InstanceState.READY, f"answering again after {rec.failures} failed probe(s)")
        elif rec.state is not InstanceState.READY:
            took = b.now - rec.starting_since
            # STARTING/UNHEALTHY -> READY
            after = f" after {_fmt(took)}" if rec.state is InstanceState.STARTING else ""
            b.change_state(InstanceState.READY, f"first good probe{after}")
            b.update(attempts=0, retry_at=0.0, startup_error="")
        elif not b.events:
            b.update(reason="answering")
        return

    failures = rec.failures + 1
    error = probe.device_error or probe.error or "probe failed"
    b.update(failures=failures, last_error=error)
    if probe.device_error:
        # Deterministic: the instance runs on the wrong device. STARTING/READY -> UNHEALTHY
        if can_act:
            _restart(b, cfg, f"wrong device: {probe.device_error}")
        else:
            b.change_state(InstanceState.UNHEALTHY, f"wrong device: {probe.device_error}")
        return
    if rec.state is InstanceState.STARTING:
        elapsed = b.now - rec.starting_since
        # ComfyUI binds its port only at the very end of its start: a port that accepts
        # connections but does not answer is a hang, not a slow start.
        bound = rec.bound_failures + 1 if probe.tcp else 0
        b.update(bound_failures=bound)
        if bound >= cfg.unhealthy_threshold and can_act:
            _restart(b, cfg, f"port open but not answering: {bound} failed probes in a row (last: {error})")
            return
        if elapsed >= cfg.startup_timeout and failures >= cfg.unhealthy_threshold and can_act:
            cause = f"not ready after {_fmt(elapsed)} (STARTUP_TIMEOUT={_fmt(cfg.startup_timeout)}): {error}"
            _restart(b, cfg, cause)
            return
        detail = f"; traceback: {b.rec.startup_error}" if b.rec.startup_error else ""
        b.update(reason=f"starting for {_fmt(elapsed)}: {error}{detail}")
        return
    if failures >= cfg.unhealthy_threshold:
        cause = f"{failures} consecutive failed probes (last: {error})"
        if can_act:
            _restart(b, cfg, cause)
        else:
            b.change_state(InstanceState.UNHEALTHY, f"{cause}; supervisord did not answer")
        return
    if rec.state in {InstanceState.READY, InstanceState.SUSPECT}:
        # READY -> SUSPECT at once (no new jobs, not ready); the threshold decides the restart
        b.change_state(InstanceState.SUSPECT, f"{failures} failed probe(s): {error}")


def _oom(b: _Builder, cfg: HealthConfig) -> None:
    events = tuple(t for t in b.rec.oom_events if b.now - t < cfg.oom_window) + (b.now,)
    if len(events) >= cfg.oom_restart_count:
        _restart(b, cfg, f"{len(events)} out-of-memory errors within {_fmt(cfg.oom_window)}", forced=True)
        return
    b.update(oom_events=events)
    b.actions.append(Action.FREE)
    b.events.append("out-of-memory error: freeing memory (POST /free)")


def decide(
    rec: Record,
    proc: ProcessInfo | None,
    probe: ProbeResult | None,
    now: float,
    cfg: HealthConfig,
    *,
    hung: str = "",
    restart_requested: str = "",
) -> Decision:
    """The next record of one instance, the actions to take and the transitions, with reasons.

    Args:
        rec: the previous record.
        proc: supervisord's view of the program; ``None`` when supervisord did not answer
            (then no action is taken: the monitor never acts blind).
        probe: this round's probe, ``None`` when the instance was not probed.
        now: monotonic seconds.
        cfg: thresholds and timeouts.
        hung: a job reported the instance stuck (the reason); it is restarted.
        restart_requested: an operator asked for a restart (the reason); no backoff applies.
    """
    b = _Builder(rec, now)
    if proc is None:
        _probe_running(b, cfg, probe, None)
        return b.decision()

    state = proc.state
    if state in PROBED_STATES and proc.pid > 0:
        _new_process(b, proc)
    if restart_requested:
        _restart(b, cfg, restart_requested, forced=True)
        return b.decision()

    if state in PROBED_STATES:
        if hung and b.rec.state in _HUNG_ACTS_ON:
            _apply_logs(b, probe)
            _restart(b, cfg, f"reported hung: {hung}")
            return b.decision()
        if b.rec.state in {InstanceState.STOPPED, InstanceState.FATAL, InstanceState.BACKOFF}:
            # supervisord (or an operator) started it again: STOPPED/FATAL/BACKOFF -> STARTING
            b.update(starting_since=now, failures=0)
            b.change_state(InstanceState.STARTING, f"supervisord reports {state.name}: {_WAITING}")
        _probe_running(b, cfg, probe, proc)
        return b.decision()

    _apply_logs(b, probe)
    b.update(queue_pending=None, queue_running=None, failures=0)
    status = f"exit status {proc.exitstatus}" if proc.exitstatus else ""
    detail = proc.spawnerr or status or proc.description
    if state is ProcessState.BACKOFF:
        # RUNNING -> BACKOFF: supervisord is retrying by itself
        b.change_state(InstanceState.BACKOFF, f"exited while starting; supervisord retries ({detail})")
    elif state is ProcessState.FATAL:
        cause = f"supervisord gave up ({detail or 'too many failed starts'})"
        _retry_start(b, cfg, InstanceState.FATAL, cause)
    elif state is ProcessState.EXITED:
        _retry_start(b, cfg, InstanceState.BACKOFF, f"exited ({detail or 'status 0'}) and was not restarted")
    elif state is ProcessState.STOPPING:
        if b.rec.state is not InstanceState.RESTARTING:
            b.change_state(InstanceState.STOPPED, "stopping")
    elif state is ProcessState.UNKNOWN:
        b.change_state(InstanceState.STOPPED, proc.description or "supervisord reports an unknown state")
    elif state is ProcessState.STOPPED:
        if b.rec.state is InstanceState.RESTARTING:
            # our restart stopped it but the start did not happen: RESTARTING -> STARTING
            b.actions.append(Action.START)
            b.update(starting_since=now)
            b.change_state(InstanceState.STARTING, "stopped during a restart: starting it")
        else:
            b.change_state(InstanceState.STOPPED, "stopped by an operator (orchestrator stop)")
    return b.decision()


def after_action(rec: Record, action: Action, error: str, now: float) -> Decision:
    """The monitor finished ``action``; ``error`` is "" when it succeeded."""
    b = _Builder(rec, now)
    if action is Action.FREE:
        if error:
            b.events.append(f"POST /free failed: {error}")
        return b.decision()
    if error:
        b.update(reason=f"{rec.reason}; {action.value} failed: {error}")
        return b.decision()
    b.update(starting_since=now, failures=0)
    if rec.state is InstanceState.RESTARTING:
        # RESTARTING -> STARTING
        b.change_state(InstanceState.STARTING, f"restarted through supervisord: {_WAITING}")
    return b.decision()
