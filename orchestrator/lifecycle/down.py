"""``down``: stop every program gracefully, then supervisord, then kill what it left behind.

Processes are identified by pid and create time (``psutil.Process``), captured before the long
wait, so a pid that was reused meanwhile is never killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import psutil

from orchestrator.core.errors import SupervisorError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.clock import wait_for
from orchestrator.machine.orphans import port_holders, stop_orphans
from orchestrator.machine.ports import port_free
from orchestrator.machine.state import applied_plan
from orchestrator.machine.supervisor import Supervisor, socket_in_use

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Teardown:
    """The outcome of ``down``.

    ``problems``: what is still wrong (one line each; empty when clean). ``survivors``: pids of
    leftover processes that had to be killed with SIGKILL.
    """

    was_running: bool
    problems: tuple[str, ...] = ()
    survivors: tuple[int, ...] = ()
    orphans: tuple[int, ...] = ()  # pids of an earlier generation's processes that were stopped

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "was_running": self.was_running,
                "problems": list(self.problems), "survivors": list(self.survivors),
                "orphans": list(self.orphans)}


def down(settings: Settings) -> Teardown:
    """Stop every program gracefully, then supervisord, and wait for the instances' ports."""
    layout = Layout(settings.root)
    sup = Supervisor(layout, timeout=settings.stop_timeout * 4 + 30 + settings.shutdown_drain_timeout)
    plan = applied_plan(layout)
    problems: list[str] = []
    survivors: list[int] = []
    was_running = sup.is_running()
    if was_running:
        pid = sup.pid()
        # Captured as psutil.Process objects (pid + create time) BEFORE the long wait: a pid that
        # exited and was reused meanwhile is someone else's process and must not be killed.
        supervisord, tree = _process_tree(pid)
        sup.stop_all()
        with contextlib.suppress(SupervisorError):
            sup.shutdown()
        if not wait_for(lambda: not _alive(supervisord), settings.stop_timeout + 15):
            problems.append(f"supervisord (pid {pid}) did not exit")
        survivors = kill_leftovers(tree)
        if survivors:
            log.warning("killed %d leftover process(es): %s", len(survivors), survivors)
    _remove_socket(layout, problems)
    orphans: list[int] = []
    if plan is not None:
        ports = {i.port: i.name for i in plan.instances}
        ports[settings.orchestrator_port] = "monitor"
        # Processes of an earlier generation that outlived a killed supervisord: ours, so stopped.
        stale = [h for h in port_holders(layout.root, ports) if h.ours]
        if stale:
            orphans = stop_orphans(layout.root, stale, grace=settings.stop_timeout)
            log.warning("stopped %d orphaned process(es) of this ROOT: %s", len(orphans), orphans)
        instance_ports = [i.port for i in plan.instances]
        if not wait_for(lambda: all(port_free(p) for p in instance_ports), 10, 0.1):
            foreign = {h.port: h for h in port_holders(layout.root, ports) if not h.ours}
            problems += [
                f"port {p} still in use" + (
                    f" by pid {foreign[p].pid} ({foreign[p].name}), not a process of this ROOT: left running"
                    if p in foreign else ""
                )
                for p in instance_ports if not port_free(p)
            ]
    return Teardown(was_running, tuple(problems), tuple(survivors), tuple(orphans))


def _remove_socket(layout: Layout, problems: list[str]) -> None:
    """Unlink the control socket only when no process listens on it: a slow (or stopped)
    supervisord that did not answer keeps its socket, or no command could reach it again."""
    if not (layout.socket.exists() or layout.socket.is_symlink()):
        return
    if socket_in_use(layout.socket):
        problems.append(
            f"a process still listens on {layout.socket} but supervisord did not answer: "
            "the socket was left in place; retry `orchestrator down`"
        )
        return
    with contextlib.suppress(FileNotFoundError):
        layout.socket.unlink()


def _process_tree(pid: int) -> tuple[psutil.Process | None, list[psutil.Process]]:
    """The process ``pid`` and its descendants, identified by pid and create time."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return None, []
    try:
        return root, root.children(recursive=True)
    except psutil.Error:
        return root, []


def _alive(proc: psutil.Process | None) -> bool:
    """Still the same process (``is_running`` checks the create time) and not a zombie."""
    if proc is None:
        return False
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_leftovers(procs: list[psutil.Process]) -> list[int]:
    """SIGKILL those of ``procs`` still running as the same process; returns their pids.

    ``Process.kill`` itself refuses a pid that was reused by another process.
    """
    killed: list[int] = []
    for proc in procs:
        if not _alive(proc):
            continue
        try:
            proc.kill()
        except psutil.Error:
            continue
        killed.append(proc.pid)
    return killed
