"""Wiring ``orchestrator serve``: the monitor, its metrics registry, the job manager and the
FastAPI app, served by uvicorn on a socket bound beforehand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from orchestrator.core.errors import OrchestratorError
from orchestrator.core.layout import Layout
from orchestrator.core.plan import MachinePlan
from orchestrator.core.scaling import MachineLoad, machine_load
from orchestrator.core.settings import Settings
from orchestrator.jobs.journal import JobJournal
from orchestrator.jobs.routes import jobs_router
from orchestrator.jobs.tracker import JobManager
from orchestrator.jobs.uploads import OutputUploader, UploadCollector
from orchestrator.machine.state import applied_plan
from orchestrator.monitor.api import create_app, with_fast_probes
from orchestrator.monitor.collectors import MachineCollector
from orchestrator.monitor.drain_api import drain_router
from orchestrator.monitor.loop import Monitor
from orchestrator.monitor.metrics import build_registry

log = logging.getLogger(__name__)


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
    """The monitor, its metrics registry, the job manager and the FastAPI app, wired together.

    ``app.state.jobs`` is the job manager (:class:`DrainingServer` drains it on SIGTERM).
    """
    monitor = monitor or Monitor(settings, plan)
    layout = Layout(settings.root)
    registry = build_registry(monitor, settings, layout)
    outputs = {inst.index: inst.output_dir for inst in plan.instances}
    uploader = OutputUploader(settings, outputs.__getitem__) if settings.output_upload else None
    if uploader is not None:
        registry.register(UploadCollector(uploader))
    manager = JobManager(
        settings, monitor, registry, journal=JobJournal(layout.jobs_dir), gpu_statuses=monitor.gpu_statuses,
        uploader=uploader,
    )
    monitor.set_inflight(manager.inflight)

    def load() -> MachineLoad:
        """The autoscaling signals (``/scaling``, ``comfyui_machine_*``): one function, one answer."""
        return machine_load(monitor.snapshot(), manager.inflight(), settings.max_queue_depth, draining=manager.draining)

    registry.register(MachineCollector(load))

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
    app = create_app(monitor, settings, registry, routers=routers, lifespan=lifespan, scaling=load)
    app.state.jobs = manager
    return app, monitor


class DrainingServer(uvicorn.Server):
    """uvicorn that drains the job API on the first SIGTERM/SIGINT before it shuts down.

    Draining: new jobs get 503 ``draining``, /readyz is 503, /scaling and the metrics say so, and
    every other route still answers (``GET /jobs/{id}``, the probes); the server exits once no job
    is in flight or after ``grace`` seconds, whichever comes first. A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, manager: JobManager, grace: float) -> None:
        super().__init__(config)
        self.manager = manager
        self.grace = grace
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None or self.grace <= 0:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it once served (the exit status)
        self.drain_deadline = time.monotonic() + self.grace
        self.manager.drain()

    async def on_tick(self, counter: int) -> bool:
        deadline = self.drain_deadline
        if deadline is not None and not self.should_exit:
            if self.manager.idle():
                log.info("drained: no job in flight; shutting down")
                self.should_exit = True
            elif time.monotonic() >= deadline:
                log.warning("drain grace of %gs over with jobs in flight; shutting down", self.grace)
                self.should_exit = True
        return await super().on_tick(counter)


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
    # The probe paths (/healthz, /readyz, /metrics) are answered in front of FastAPI.
    server = DrainingServer(uvicorn_config(with_fast_probes(app)), app.state.jobs, settings.shutdown_drain_timeout)

    def loop_failed() -> None:
        # A dead probe loop must not leave a monitor that serves stale answers: stop at once
        # (no drain), and let supervisord start a fresh one.
        server.grace = 0.0
        os.kill(os.getpid(), signal.SIGTERM)

    monitor.on_loop_failure = loop_failed
    await server.serve(sockets=[sock])
