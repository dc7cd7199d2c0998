"""Watch the watcher: the monitor's heartbeat file, and the watchdog that restarts a stuck monitor.

A SIGSTOPped (or otherwise wedged) monitor stays RUNNING for supervisord: its process exists,
so nothing restarts it, and probes, restarts and metrics silently stop. So:

- the monitor's probe loop touches ``$ROOT/.orchestrator/monitor.heartbeat`` (:class:`Heartbeat`)
  on every tick (every ``min(PROBE_INTERVAL, 0.25 s)``); the file holds the monitor's pid and its
  mtime is the beat;
- ``orchestrator health --live`` fails when the beat is older than :func:`stale_after`
  (3 × max(PROBE_INTERVAL, PROBE_TIMEOUT) + 5 s: a tick waits at most PROBE_TIMEOUT on supervisord),
  even when the monitor's port still answers;
- supervisord runs this module as an event listener (``[eventlistener:watchdog]``, ``TICK_5``):
  every 5 s it asks supervisord for the monitor's process and, when that process has been
  RUNNING past the bound and its beat is stale (or it never beat), sends it SIGKILL through
  supervisord (``signalProcess``). supervisord sees an unexpected exit and starts a fresh monitor
  at once (``autorestart=true``), which re-binds its port and beats again.

Why an event listener and not a loop of our own: supervisord's own clock drives it (no timer
or sleep to get wrong), it is started, restarted and stopped with the rest of the machine, and
it talks to supervisord over the same socket the CLI uses. Why SIGKILL and not a graceful stop:
a stopped or wedged process handles no SIGTERM (a graceful stop would wait STOP_TIMEOUT and then
kill anyway), and a stuck monitor has nothing left to flush: job state lives in the job store.

The listener protocol is supervisord's: write ``READY``, read a header line and its payload,
answer ``RESULT 2\\nOK``; nothing else may be written to stdout (logging goes to stderr).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from orchestrator.core.errors import OrchestratorError
from orchestrator.core.layout import Layout
from orchestrator.core.states import ProcessInfo, ProcessState
from orchestrator.machine.fs import atomic_write
from orchestrator.machine.supervisor import Supervisor

log = logging.getLogger(__name__)

MONITOR = "monitor"  # the supervisord program watched
SLACK = 5.0  # seconds on top of three ticks' worth of waiting
STARTUP_GRACE = 30.0  # seconds a fresh monitor may take to beat for the first time


def heartbeat_path(layout: Layout) -> Path:
    return layout.state_dir / "monitor.heartbeat"


def stale_after(probe_interval: float, probe_timeout: float) -> float:
    """Seconds after which a heartbeat means a stuck monitor."""
    return 3 * max(probe_interval, probe_timeout) + SLACK


class Heartbeat:
    """The monitor's side: :meth:`beat` on every tick (never raises; a failure is logged once)."""

    def __init__(self, path: Path, pid: int | None = None) -> None:
        self.path = path
        self.pid = pid if pid is not None else os.getpid()
        self._written = False
        self._warned = False

    def beat(self) -> None:
        try:
            if not self._written:
                atomic_write(self.path, f"{self.pid}\n", mode=0o600)
                self._written = True
            os.utime(self.path)  # the beat (also after a write that found the same content)
        except FileNotFoundError:
            self._written = False  # removed under us: written again next tick
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write the heartbeat %s: %s", self.path, exc.strerror or exc)
                self._warned = True


def read_heartbeat(path: Path) -> tuple[int, float] | None:
    """(pid, mtime in epoch seconds) of the last beat, or None when there is none readable."""
    try:
        mtime = path.stat().st_mtime
        pid = int(path.read_text(encoding="ascii", errors="replace").strip() or "0")
    except (OSError, ValueError):
        return None
    return pid, mtime


def heartbeat_age(path: Path, now: float | None = None) -> float | None:
    """Seconds since the last beat, or None when there is no heartbeat file."""
    beat = read_heartbeat(path)
    return None if beat is None else max(0.0, (time.time() if now is None else now) - beat[1])


def stuck_reason(proc: ProcessInfo | None, beat: tuple[int, float] | None, now: float, bound: float) -> str:
    """Why the monitor process ``proc`` counts as stuck ("" when it does not). Pure.

    Only a process supervisord holds RUNNING for longer than ``bound`` can be stuck (a starting,
    backing-off or stopped monitor is supervisord's business).
    """
    if proc is None or proc.state != ProcessState.RUNNING or proc.uptime <= bound:
        return ""
    if beat is None or beat[0] != proc.pid:
        if proc.uptime <= bound + STARTUP_GRACE:
            return ""
        return f"monitor pid {proc.pid} has not written a heartbeat in {proc.uptime:.0f}s"
    age = now - beat[1]
    if age > bound:
        return f"monitor pid {proc.pid}'s heartbeat is {age:.0f}s old (bound {bound:.0f}s): its loop is stuck"
    return ""


def check_and_restart(sup: Supervisor, layout: Layout, bound: float, now: Callable[[], float] = time.time) -> str:
    """One watchdog round: SIGKILL a stuck monitor through supervisord. Returns why, or ""."""
    try:
        proc = sup.process(MONITOR)
    except OrchestratorError as exc:
        log.warning("watchdog: cannot read the monitor's process: %s", exc)
        return ""
    reason = stuck_reason(proc, read_heartbeat(heartbeat_path(layout)), now(), bound)
    if reason:
        log.error("watchdog: %s; killing it so that supervisord starts a fresh one", reason)
        try:
            sup.signal(MONITOR, "KILL")
        except OrchestratorError as exc:
            log.warning("watchdog: could not kill the monitor: %s", exc)
    return reason


def listen(stdin: IO[str], stdout: IO[str], on_tick: Callable[[], object]) -> None:
    """supervisord's event listener protocol until stdin closes; ``on_tick`` on every TICK event."""
    while True:
        stdout.write("READY\n")
        stdout.flush()
        header = stdin.readline()
        if not header:
            return
        fields = dict(token.split(":", 1) for token in header.split() if ":" in token)
        stdin.read(int(fields.get("len", "0") or 0))  # the payload: nothing in it we need
        if fields.get("eventname", "").startswith("TICK"):
            try:
                on_tick()
            except Exception:  # noqa: BLE001 - one failed round must not end the listener
                log.exception("watchdog round failed")
        stdout.write("RESULT 2\nOK")
        stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.machine.watchdog --root ROOT --stale-after SECONDS`` under supervisord."""
    import argparse

    parser = argparse.ArgumentParser(prog="orchestrator.machine.watchdog")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--stale-after", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    layout = Layout(args.root)
    sup = Supervisor(layout, timeout=5.0)
    listen(sys.stdin, sys.stdout, lambda: check_and_restart(sup, layout, args.stale_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
