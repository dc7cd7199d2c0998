"""Wiring ``orchestrator serve``: the monitor, its metrics registry, the job manager and the
FastAPI app, served by uvicorn on a socket bound beforehand."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from orchestrator.core.errors import OrchestratorError
from orchestrator.core.layout import Layout
from orchestrator.core.plan import MachinePlan
from orchestrator.core.settings import Settings
from orchestrator.jobs.routes import jobs_router
from orchestrator.jobs.tracker import JobManager
from orchestrator.machine.state import applied_plan
from orchestrator.monitor.api import create_app, with_fast_probes
from orchestrator.monitor.drain_api import drain_router
from orchestrator.monitor.loop import Monitor
from orchestrator.monitor.metrics import build_registry


def load_plan(layout: Layout) -> MachinePlan:
    """The plan `orchestrator up` applied. Raises OrchestratorError when there is none."""
    plan = applied_plan(layout)
    if plan is None:
        raise OrchestratorError(f"no readable plan at {layout.plan_file}: run `orchestrator up` first")
    return plan


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for the HTTP server. Raises OrchestratorError (one line) for a busy port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket says it is TCP. Without it a response written as headers + body waits for a
    # delayed ACK (~40 ms per request on a keep-alive connection).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OrchestratorError(
            f"the monitor cannot listen on {host}:{port} ({exc.strerror or exc}): "
            "set ORCHESTRATOR_PORT to a free port or ORCHESTRATOR_LISTEN to a local address"
        ) from None
    sock.set_inheritable(True)
    return sock


def build_app(settings: Settings, plan: MachinePlan, monitor: Monitor | None = None) -> tuple[FastAPI, Monitor]:
    """The monitor, its metrics registry, the job manager and the FastAPI app, wired together."""
    monitor = monitor or Monitor(settings, plan)
    registry = build_registry(monitor, settings, Layout(settings.root))
    manager = JobManager(settings, monitor, registry)
    monitor.set_inflight(manager.inflight)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await monitor.start()
        await manager.start()
        try:
            yield
        finally:
            await manager.close()
            await monitor.close()

    routers = [jobs_router(manager), drain_router(monitor, settings)]
    app = create_app(monitor, settings, registry, routers=routers, lifespan=lifespan)
    return app, monitor


def uvicorn_config(app: ASGIApp, http: Literal["httptools", "h11"] = "httptools") -> uvicorn.Config:
    """How the monitor's app is served. httptools (C) parses HTTP several times faster than h11
    (pure Python): under many concurrent probes and scrapes the parser, not the handlers, set
    the latency (bench/bench_http_stack.py)."""
    return uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
        server_header=False, ws="none",  # no WebSocket routes: do not load a WebSocket stack
        http=http,
    )


def run_server(config: uvicorn.Config, sock: socket.socket, *, uvloop: bool = True) -> None:
    """Serve ``config`` on ``sock`` until SIGTERM/SIGINT, on uvloop's event loop unless told not to."""
    run_loop(uvicorn.Server(config).serve(sockets=[sock]), uvloop=uvloop)


def run_loop(main: Coroutine[Any, Any, None], *, uvloop: bool = True) -> None:
    """``asyncio.run(main)``, on uvloop's event loop (libuv: faster I/O and scheduling) by default."""
    if uvloop:
        import uvloop as uv

        with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


async def serve(settings: Settings, plan: MachinePlan, sock: socket.socket) -> None:
    """Run the monitor and its HTTP API on ``sock`` until SIGTERM/SIGINT (on the running loop)."""
    app, monitor = build_app(settings, plan)
    # A dead probe loop must not leave a monitor that serves stale answers: stop, and let
    # supervisord start a fresh one.
    monitor.on_loop_failure = lambda: os.kill(os.getpid(), signal.SIGTERM)
    # The probe paths (/healthz, /readyz, /metrics) are answered in front of FastAPI.
    await uvicorn.Server(uvicorn_config(with_fast_probes(app))).serve(sockets=[sock])
