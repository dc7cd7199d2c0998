"""Processes of an earlier generation of this ROOT that outlived their supervisord, and stopping them.

A process on one of the plan's ports is *ours* only when all of these hold: it runs as our user,
its working directory is this ROOT or below it, and its argv names a path under this ROOT or its
environment has ``ROOT`` set to it (the monitor: ``python -m orchestrator serve`` run in
``$ROOT``; an instance: ``main.py … --output-directory $ROOT/…`` in ``$ROOT/ComfyUI``).
Anything else on a port is *foreign*: reported by pid and name, never signalled. Processes are
held as ``psutil.Process`` objects (pid + create time), so a pid reused meanwhile is never killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

_EXPECTED = (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError)


@dataclasses.dataclass(frozen=True)
class PortHolder:
    """A process listening on one of the plan's ports."""

    port: int
    purpose: str  # what the port is for: an instance name or "monitor"
    pid: int
    name: str
    ours: bool  # of an earlier generation under this ROOT

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _listeners(ports: Iterable[int]) -> dict[int, int]:
    """port -> pid of the process listening on it (those the OS tells us about)."""
    wanted = set(ports)
    try:
        conns = psutil.net_connections(kind="tcp")
    except _EXPECTED:
        return {}
    return {
        c.laddr.port: c.pid
        for c in conns
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in wanted and c.pid
    }


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def is_ours(proc: psutil.Process, root: Path) -> bool:
    """Whether ``proc`` belongs to this ROOT (see the module docstring); False when unsure."""
    roots = {str(root), str(root.resolve())}
    try:
        if proc.uids().real != os.getuid():
            return False
        if not _under(proc.cwd(), roots):
            return False
        argv = proc.cmdline()
        if any(_under(arg, roots) or any(r + "/" in arg for r in roots) for arg in argv):
            return True
        if proc.cwd() in roots and argv[-1:] == ["serve"] and "orchestrator" in argv:
            return True  # the monitor (`python -m orchestrator serve`), whatever its environment
        return proc.environ().get("ROOT") in roots
    except _EXPECTED:
        return False


def port_holders(root: Path, ports: Mapping[int, str], exclude: Iterable[int] = ()) -> list[PortHolder]:
    """Who listens on ``ports`` (port -> purpose), leaving out the pids in ``exclude`` (a running
    supervisord's own tree)."""
    skip = set(exclude)
    out = []
    for port, pid in sorted(_listeners(ports).items()):
        if pid in skip:
            continue
        try:
            proc = psutil.Process(pid)
            name = proc.name()
        except _EXPECTED:
            continue
        out.append(PortHolder(port, ports[port], pid, name, is_ours(proc, root)))
    return out


def stop_orphans(root: Path, holders: Iterable[PortHolder], grace: float) -> list[int]:
    """Stop the processes of ours among ``holders`` and their children: SIGTERM, then SIGKILL
    after ``grace`` seconds. Foreign holders are never touched. Returns the pids signalled."""
    procs: dict[int, psutil.Process] = {}
    for holder in holders:
        if not holder.ours:
            continue
        try:
            proc = psutil.Process(holder.pid)
        except _EXPECTED:
            continue
        if not is_ours(proc, root):  # re-checked on the process object we will signal
            continue
        procs[proc.pid] = proc
        with contextlib.suppress(*_EXPECTED):
            procs.update({c.pid: c for c in proc.children(recursive=True) if c.uids().real == os.getuid()})
    for proc in procs.values():
        with contextlib.suppress(*_EXPECTED):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for proc in alive:
        with contextlib.suppress(*_EXPECTED):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return sorted(procs)
