"""The monitor's two uses of supervisord: polling the process table, and restarting or starting
a program. Each runs in a thread pool of its own: a restart's stop (up to STOP_TIMEOUT) must never
hold up the poll, as it would in asyncio's small shared default executor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from orchestrator.core.errors import SupervisorError
from orchestrator.core.health import Action
from orchestrator.core.readiness import Liveness
from orchestrator.core.states import ProcessInfo, ProcessState

log = logging.getLogger(__name__)


class SupervisorLike(Protocol):
    """The part of :class:`~orchestrator.machine.supervisor.Supervisor` the monitor uses (faked in tests)."""

    def processes(self) -> list[ProcessInfo]: ...

    def start(self, name: str, wait: bool = False) -> None: ...

    def stop(self, name: str, wait: bool = True) -> None: ...

    def signal(self, name: str, sig: str) -> None: ...


SupervisorFactory = Callable[[float], SupervisorLike]  # RPC timeout (seconds) -> client


def unknown_process(name: str, now: float) -> ProcessInfo:
    """A planned program supervisord does not know (its configuration predates the plan)."""
    why = f"no program {name} in supervisord: run `orchestrator up` to apply the plan"
    return ProcessInfo(name, ProcessState.UNKNOWN, 0, 0.0, now, 0, "", why)


class SupervisordPoller:
    """Reads supervisord's process table without ever waiting longer than ``timeout``.

    A poll that does not answer in time keeps running; the next :meth:`poll` waits on it again
    instead of sending another, so a slow supervisord never piles up requests.
    """

    def __init__(self, factory: SupervisorFactory, timeout: float, clock: Callable[[], float]) -> None:
        self._factory = factory
        self._timeout = timeout
        self._clock = clock
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="supervisord-poll")
        self._client: SupervisorLike | None = None
        self._task: asyncio.Future[list[ProcessInfo]] | None = None
        self._sent = 0.0
        self.polled_at = 0.0  # when the last answered poll was sent: its table is at least that recent
        self.ok = False
        self.error = "no answer yet"
        self.last_answer: float | None = None  # clock() of the last answer

    async def poll(self) -> dict[str, ProcessInfo] | None:
        """supervisord's process table by name, or None when it does not answer within the timeout."""
        if self._task is None or self._task.done():
            if self._client is None:
                self._client = self._factory(self._timeout)
            self._sent = self._clock()
            self._task = asyncio.get_running_loop().run_in_executor(self._pool, self._client.processes)
        done, _ = await asyncio.wait({self._task}, timeout=self._timeout)
        if not done:
            # Slow, not gone: no decisions this tick; liveness fails only if it stays silent.
            log.debug("supervisord did not answer within %gs", self._timeout)
            return None
        try:
            procs = self._task.result()
        except SupervisorError as exc:
            self._set(False, str(exc))
            return None
        self._set(True, "")
        self.last_answer = self._clock()
        self.polled_at = self._sent
        return {p.name: p for p in procs}

    def _set(self, ok: bool, why: str) -> None:
        if ok != self.ok:
            if ok:
                log.info("supervisord answers")
            else:
                log.warning("supervisord: %s", why)
        self.ok = ok
        self.error = why

    def liveness(self, loop_running: bool, stale: float) -> Liveness:
        """Alive while the probe loop runs and supervisord answered within ``stale`` seconds."""
        age = None if self.last_answer is None else self._clock() - self.last_answer
        if not loop_running:
            return Liveness(False, self.ok, age, "the probe loop is not running")
        if not self.ok:
            return Liveness(False, False, age, f"supervisord does not answer: {self.error}")
        if age is None or age > stale:
            return Liveness(False, False, age, f"no answer from supervisord for {stale:g}s")
        return Liveness(True, True, age, "ok")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SupervisorActions:
    """Restarts and starts programs through supervisord, each call in a thread of a pool of its own."""

    def __init__(self, factory: SupervisorFactory, stop_timeout: float, workers: int) -> None:
        self._factory = factory
        self._stop_timeout = stop_timeout
        self._pool = ThreadPoolExecutor(max(2, workers), thread_name_prefix="supervisord-action")

    async def run(self, name: str, action: Action) -> str:
        """Carry out RESTART or START; "" on success, else a one-line error."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._call, name, action)
        except SupervisorError as exc:
            log.error("%s: %s failed: %s", name, action.value, exc)  # noqa: TRY400 - the message is the whole story
            return str(exc)
        return ""

    def _call(self, name: str, action: Action) -> None:
        # A client of its own: a stop waits up to STOP_TIMEOUT and must not hold up the poller.
        sup = self._factory(self._stop_timeout + 30)
        if action is Action.RESTART:
            # A SIGSTOPped process would leave SIGTERM pending until stopwaitsecs ran out.
            with contextlib.suppress(SupervisorError):
                sup.signal(name, "CONT")
            sup.stop(name, wait=True)
        sup.start(name, wait=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
