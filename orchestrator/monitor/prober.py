"""Runs the probes of :mod:`orchestrator.monitor.probes` for the loop: the log scan in a thread
pool, the process-stopped check, and the HTTP probe over one shared session."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import psutil

from orchestrator.core.health import PROBED_STATES, ProbeResult
from orchestrator.core.plan import Instance
from orchestrator.core.states import ProcessInfo
from orchestrator.monitor.probes import LogScanner, free_memory, probe_http


def process_stopped(pid: int) -> bool:
    """True when ``pid`` is stopped by a signal (SIGSTOP, SIGTSTP: state ``T`` in /proc): it cannot answer.

    Read every tick for running instances (one small read each), so a stopped instance is restarted
    within a second instead of after UNHEALTHY_THRESHOLD probes that each wait PROBE_TIMEOUT.
    """
    if pid <= 0:
        return False
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_STOPPED)
    except psutil.Error:
        return False


class Prober:
    """Probes instances; :meth:`start` and :meth:`close` run in the monitor's event loop.

    Args:
        instances: how many instances share the session (its connection limit).
        timeout: PROBE_TIMEOUT, seconds.
        mock: MOCK_GPU: the planned device is the CPU.
        clock: monotonic seconds (probe durations).
    """

    def __init__(self, instances: int, timeout: float, *, mock: bool, clock: Callable[[], float]) -> None:
        self._connections = 4 * instances + 4
        self._timeout = timeout
        self._mock = mock
        self._clock = clock
        self._scan_pool = ThreadPoolExecutor(2, thread_name_prefix="log-scan")
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        # Plain HTTP to 127.0.0.1 only: no proxies from the environment (aiohttp's default), and
        # no keep-alive, so a connection to a hung instance is never handed to the next probe.
        connector = aiohttp.TCPConnector(limit=self._connections, force_close=True)
        self._session = aiohttp.ClientSession(connector=connector)

    def session(self) -> aiohttp.ClientSession:
        """The session the probes use (for other calls to the instances, e.g. a drain's interrupt)."""
        return self._client()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Prober.start() was not called")
        return self._session

    async def probe(self, inst: Instance, scanner: LogScanner, proc: ProcessInfo | None) -> ProbeResult:
        """New log lines, then the instance's answer (not asked when its process cannot answer)."""
        logs = await asyncio.get_running_loop().run_in_executor(self._scan_pool, scanner.scan)
        if proc is not None and proc.state not in PROBED_STATES:
            return ProbeResult(ok=False, error=f"supervisord reports {proc.state.name}", logs=logs)
        if proc is not None and process_stopped(proc.pid):
            return ProbeResult(ok=False, error=f"process {proc.pid} is stopped (SIGSTOP): it cannot answer", logs=logs)
        result = await probe_http(
            self._client(), inst.port, inst.gpu, mock=self._mock, timeout=self._timeout, clock=self._clock
        )
        return dataclasses.replace(result, logs=logs)

    async def free(self, inst: Instance) -> str:
        """``POST /free`` on the instance; "" on success, else why it failed."""
        return await free_memory(self._client(), inst.port, self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._scan_pool.shutdown(wait=False, cancel_futures=True)
