"""Is a port free, and if not, who holds it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Collection, Iterable

import psutil

from orchestrator.core.errors import PlanError

_EXPECTED = (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option aiohttp/uvicorn use, so a TIME_WAIT leftover does not count as busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> tuple[int, str] | None:
    """(pid, process name) listening on ``port``, when the OS tells."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except _EXPECTED:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                return c.pid, psutil.Process(c.pid).name()
            except _EXPECTED:
                return c.pid, "?"
    return None


def family(pids: Iterable[int]) -> set[int]:
    """The pids and all their descendants."""
    out: set[int] = set()
    for pid in pids:
        if not pid:
            continue
        out.add(pid)
        with contextlib.suppress(*_EXPECTED):
            out.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    return out


def check_ports(ports: Iterable[tuple[int, str]], ours: Collection[int] = ()) -> None:
    """Raise when a planned port is held by a process that is not one of ``ours``.

    Args:
        ports: (port, what it is for) pairs.
        ours: pids of our own processes (a running instance may keep its port).
    """
    for port, purpose in ports:
        if port_free(port):
            continue
        holder = port_holder(port)
        if holder is not None and holder[0] in ours:
            continue
        who = f" by pid {holder[0]} ({holder[1]})" if holder else ""
        raise PlanError(
            f"port {port} ({purpose}) is already in use{who}: stop that process or set "
            "WORKER_BASE_COMFYUI_PORT / ORCHESTRATOR_PORT to free ports"
        )


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that ``base .. base+count-1`` are all free right now (tests, benchmarks,
    and choosing WORKER_BASE_COMFYUI_PORT on a shared machine)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = int(s.getsockname()[1])
        if base + count < 65000 and all(port_free(p, host) for p in range(base, base + count)):
            return base
    raise OSError(f"no block of {count} free ports found on {host}")
