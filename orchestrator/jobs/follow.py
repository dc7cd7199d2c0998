"""Following a prompt on its instance to its end: the /ws events, backed by /history.

The socket alone is never trusted: whenever ``poll_interval`` passes without an event of our
prompt (events sent to another client id, a proxy that drops frames, a fork variant),
``/history`` is read, so a finished prompt is seen within about that time. Without a socket,
``/history`` and ``/queue`` are polled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from orchestrator.comfy.client import ComfyCallError, ComfyClient, ComfySocket
from orchestrator.comfy.protocol import Dialect, classify_event, history_outcome, history_times
from orchestrator.core.instances import InstanceDirectory, InstanceView
from orchestrator.core.states import InstanceState
from orchestrator.jobs.schemas import JobErrorInfo, error_info
from orchestrator.jobs.store import Job

log = logging.getLogger(__name__)

POLL_CALL_TIMEOUT = 10.0  # seconds for one /history or /queue call while polling

# Instance states in which a job sent to it is gone (its process stopped or restarted).
# UNHEALTHY is not among them: the process may still be executing our prompt, and the
# monitor moves a really dead instance on to RESTARTING.
GONE_STATES = frozenset(
    {
        InstanceState.STOPPED,
        InstanceState.STARTING,
        InstanceState.RESTARTING,
        InstanceState.BACKOFF,
        InstanceState.FATAL,
    }
)


class Down(Exception):  # noqa: N818 - an outcome, not an error to show
    """The instance went away; ``started`` says whether it had begun our prompt."""

    def __init__(self, reason: str, started: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.started = started


@dataclasses.dataclass
class Tracking:
    """What every attempt shares: the directory, the clock, the polling rates, and each
    instance's /ws dialect as learned from its greetings (GPU index -> upstream | fork)."""

    directory: InstanceDirectory
    clock: Callable[[], float]
    poll_interval: float
    check_interval: float
    dialects: dict[int, Dialect] = dataclasses.field(default_factory=dict)
    saved: Callable[[Job], None] = lambda job: None  # the job's instance has its prompt (journal it)


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: Literal["done", "error", "interrupted", "timeout"]
    error: JobErrorInfo | None = None


def gone(view: InstanceView, directory: InstanceDirectory) -> str | None:
    """Why the instance can no longer be running our prompt, or None."""
    for v in directory.snapshot():
        if v.index == view.index:
            return None if v.state not in GONE_STATES else f"{view.name} (GPU {view.index}) is {v.state.value}"
    return f"{view.name} (GPU {view.index}) is no longer in the directory"


def mark_started(job: Job, now: float) -> None:
    if job.started_mono is None:
        job.started_mono = now
        job.status = "running"


async def follow(
    job: Job, view: InstanceView, client: ComfyClient, socket: ComfySocket | None, t: Tracking
) -> Outcome:
    """Follow the job's prompt to a final event (or its deadline).

    Raises:
        Down: the instance went away.
    """
    if socket is not None:
        outcome = await _follow_ws(job, view, client, socket, t)
        if outcome is not None:
            return outcome
        log.info("job %s: lost the socket to %s; polling /history", job.id, view.name)
    return await _follow_poll(job, view, client, t)


async def _follow_ws(
    job: Job, view: InstanceView, client: ComfyClient, socket: ComfySocket, t: Tracking
) -> Outcome | None:
    """Events until a final one; None when the socket dropped."""
    last_news = t.clock()
    while True:
        now = t.clock()
        remaining = job.deadline - now
        if remaining <= 0:
            return Outcome("timeout")
        why = gone(view, t.directory)
        if why:
            raise Down(why, started=job.started_mono is not None)
        poll_in = last_news + t.poll_interval - now
        if poll_in <= 0:
            last_news = t.clock()
            outcome = await _peek_history(job, view, client, t)
            if outcome is not None:
                return outcome
            continue
        try:
            message = await socket.receive(min(remaining, t.check_interval, poll_in))
        except TimeoutError:
            continue
        if message is None:
            return None
        if message.get("type") == "client_id":
            t.dialects[view.index] = "fork"  # it changed since we learned it: greet next time
        event = classify_event(message, job.prompt_id)
        if event.kind != "other":
            last_news = t.clock()
        if job.progress is not None:
            job.progress.update(message, job.prompt_id, t.clock())
        if event.kind == "started":
            mark_started(job, t.clock())
        elif event.kind == "done":
            job.ended_mono = t.clock()
            return Outcome("done")
        elif event.kind in {"error", "interrupted"}:
            job.ended_mono = t.clock()
            return Outcome(
                "error" if event.kind == "error" else "interrupted",
                None if event.error is None else error_info(event.error),
            )


async def _peek_history(job: Job, view: InstanceView, client: ComfyClient, t: Tracking) -> Outcome | None:
    """One /history read while following the socket: the outcome when the prompt is done."""
    try:
        limit = min(POLL_CALL_TIMEOUT, max(0.1, job.deadline - t.clock()))
        entry = await client.history(job.prompt_id or "", limit)
    except ComfyCallError as exc:
        log.debug("job %s: /history of %s failed: %s", job.id, view.name, exc.reason)
        return None
    return None if entry is None else ended(job, entry, t.clock())


def ended(job: Job, entry: Mapping[str, Any], now: float) -> Outcome:
    """The outcome of a prompt that is in /history (it has ended)."""
    job.ended_mono = now
    if job.started_mono is None:
        job.execution_time = history_times(entry)
    event = history_outcome(entry)
    error = None if event.error is None else error_info(event.error)
    if event.kind == "error":
        return Outcome("error", error)
    if event.kind == "interrupted":
        return Outcome("interrupted", error)
    return Outcome("done")


async def _follow_poll(job: Job, view: InstanceView, client: ComfyClient, t: Tracking) -> Outcome:
    """Poll /history (and /queue to learn whether it started) until final."""
    missing = 0
    prompt_id = job.prompt_id or ""
    while True:
        if job.deadline - t.clock() <= 0:
            return Outcome("timeout")
        why = gone(view, t.directory)
        if why:
            raise Down(why, started=job.started_mono is not None)
        try:
            limit = min(POLL_CALL_TIMEOUT, job.deadline - t.clock())
            entry = await client.history(prompt_id, limit)
            if entry is not None:
                return ended(job, entry, t.clock())
            where: str = await client.queue_position(prompt_id, limit)
        except ComfyCallError as exc:
            if exc.gone:
                started = job.started_mono is not None
                when = "while running the job" if started else "before the job started"
                raise Down(f"{view.name} (GPU {view.index}) went away {when}: {exc.reason}", started) from None
            log.debug("job %s: poll of %s failed: %s", job.id, view.name, exc.reason)
            where = "unknown"
        if where == "running":
            mark_started(job, t.clock())
        if where == "missing":
            missing += 1
            if missing >= 2:
                # Neither queued, running nor in history: the instance restarted and lost it.
                raise Down(
                    f"{view.name} (GPU {view.index}) lost prompt {job.prompt_id} (restarted?)",
                    started=job.started_mono is not None,
                )
        else:
            missing = 0
        await asyncio.sleep(min(t.poll_interval, max(0.0, job.deadline - t.clock())))
