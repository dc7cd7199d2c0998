"""After ``up`` starts programs: watch them until supervisord holds each RUNNING, or fail loud.

supervisord marks a program RUNNING only once it has stayed up for its ``startsecs``; one that
exits sooner goes to BACKOFF and, after ``startretries``, to FATAL. ``up`` used to report success
while a program it had just started crash-looped (the monitor refusing its settings, an instance
missing a dependency). :func:`watch_started` polls the process table until every program it
watches is RUNNING (or, like the one-shot background downloads, already EXITED), and raises on
the first BACKOFF or FATAL with the program's name and the last lines of its log. The
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


def watch_started(
    sup: Supervisor,
    names: Iterable[str],
    *,
    timeout: float,
    redact: Callable[[str], str] = str,
    interval: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait until each program in ``names`` is RUNNING (or EXITED); raise on BACKOFF/FATAL.

    ``timeout``: seconds to wait for programs still STARTING (their startsecs plus slack); past
    it ``up`` goes on with a warning (supervisord is slow, not the program failing).

    Raises:
        SupervisorError: a watched program is BACKOFF or FATAL, naming it and its log's last lines.
    """
    waiting = set(names)
    deadline = clock() + timeout
    while waiting:
        table = {p.name: p for p in sup.processes()}
        for name in sorted(waiting):
            proc = table.get(name)
            if proc is None:
                waiting.discard(name)  # removed meanwhile: nothing to watch
            elif proc.state in _FAILED:
                raise SupervisorError(crash_message(sup, proc, redact))
            elif proc.state in _SETTLED:
                waiting.discard(name)
        if not waiting:
            return
        if clock() >= deadline:
            log.warning("still starting after %.0fs: %s", timeout, ", ".join(sorted(waiting)))
            return
        time.sleep(interval)
