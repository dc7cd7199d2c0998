"""After ``up`` starts programs: watch them until supervisord holds each RUNNING, or fail loud.

supervisord marks a program RUNNING only once it has stayed up for its ``startsecs``; one that
exits sooner goes to BACKOFF and, after ``startretries``, to FATAL. ``up`` used to report success
while a program it had just started crash-looped (the monitor refusing its settings, an instance
missing a dependency). :func:`watch_started` polls the process table until every program it
watches is settled — RUNNING, EXITED (the one-shot background downloads), or STARTING with the
same pid for :data:`SETTLE_SECONDS` by our clock (supervisord's own times are whole seconds) —
and raises on the first BACKOFF or FATAL with the
program's name and the last lines of its log. Why not wait for RUNNING: ``startsecs`` is whole
seconds (1 at least), which made every ``up`` a second slower than its instances; the failures
this watch exists for (bad settings, a missing module, a bad flag) end a Python process well
within half a second, and a process that dies later is still the monitor's to restart. The
instances' own readiness (ComfyUI answering) is not awaited here: that is ``up --wait``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from orchestrator.core.errors import SupervisorError
from orchestrator.core.states import ProcessInfo, ProcessState
from orchestrator.machine.supervisor import Supervisor

log = logging.getLogger(__name__)

_SETTLED = frozenset({ProcessState.RUNNING, ProcessState.EXITED})
_FAILED = frozenset({ProcessState.BACKOFF, ProcessState.FATAL})
SETTLE_SECONDS = 0.5  # up this long without exiting: past the failures `up` must report
TAIL_BYTES = 4096
TAIL_LINES = 5


def log_tail(sup: Supervisor, name: str, lines: int = TAIL_LINES) -> list[str]:
    """The last non-empty lines of ``name``'s log ([] when it cannot be read)."""
    try:
        text, _, _ = sup.read_log(name, 0, TAIL_BYTES)
    except SupervisorError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]


def crash_message(sup: Supervisor, proc: ProcessInfo, redact: Callable[[str], str]) -> str:
    """One line: which program, in what state, why, and the last lines of its log."""
    why = proc.spawnerr or proc.description or f"exit status {proc.exitstatus}"
    tail = " | ".join(log_tail(sup, proc.name)) or "(its log is empty)"
    return redact(
        f"{proc.name} is crash-looping ({proc.state.name}: {why}); "
        f"last lines of its log: {tail}; see `orchestrator logs {proc.name}`"
    )


def _stayed_up(proc: ProcessInfo, seen: dict[str, tuple[int, float]], now: float, settle: float) -> bool:
    """Whether ``proc`` has been STARTING as the same process for ``settle`` seconds (a new pid
    after a crash starts the count again)."""
    if proc.state != ProcessState.STARTING or not proc.pid:
        return False
    pid, since = seen.get(proc.name, (0, now))
    if pid != proc.pid:
        seen[proc.name] = (proc.pid, now)
        return settle <= 0
    return now - since >= settle


def watch_started(
    sup: Supervisor,
    names: Iterable[str],
    *,
    timeout: float,
    redact: Callable[[str], str] = str,
    interval: float = 0.1,
    settle: float = SETTLE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait until each program in ``names`` is RUNNING (or EXITED); raise on BACKOFF/FATAL.

    ``timeout``: seconds to wait for programs still STARTING (their startsecs plus slack); past
    it ``up`` goes on with a warning (supervisord is slow, not the program failing).

    Raises:
        SupervisorError: a watched program is BACKOFF or FATAL, naming it and its log's last lines.
    """
    waiting = set(names)
    seen: dict[str, tuple[int, float]] = {}  # program -> (pid, when we first saw it STARTING)
    deadline = clock() + timeout
    while waiting:
        table = {p.name: p for p in sup.processes()}
        for name in sorted(waiting):
            proc = table.get(name)
            if proc is None:
                waiting.discard(name)  # removed meanwhile: nothing to watch
            elif proc.state in _FAILED:
                raise SupervisorError(crash_message(sup, proc, redact))
            elif proc.state in _SETTLED or _stayed_up(proc, seen, clock(), settle):
                waiting.discard(name)
        if not waiting:
            return
        if clock() >= deadline:
            log.warning("still starting after %.0fs: %s", timeout, ", ".join(sorted(waiting)))
            return
        time.sleep(interval)
