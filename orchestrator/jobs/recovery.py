"""A restarted job manager takes back the jobs its journal holds (see jobs/journal.py).

Finished jobs are served from the results store again (their TTL counted from when they ended);
a job whose instance has its prompt is followed there by ``/history`` once this monitor has
probed that instance (never sent twice); a job that was accepted but never sent is routed as
soon as an instance is READY, or fails at its deadline. These functions are the manager's own
steps, kept apart so that ``tracker.py`` stays about the normal path; they use its parts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp

from orchestrator.comfy.client import ComfyClient
from orchestrator.core.instances import InstanceView
from orchestrator.core.routing import RouteError
from orchestrator.core.states import InstanceState
from orchestrator.jobs.attempt import follow_again
from orchestrator.jobs.journal import JobJournal
from orchestrator.jobs.store import Job

if TYPE_CHECKING:
    from orchestrator.jobs.tracker import JobManager

log = logging.getLogger(__name__)


def restore(manager: JobManager, journal: JobJournal, session: aiohttp.ClientSession) -> None:
    """Serve the journal's finished jobs again, follow its sent ones, send its unsent ones."""
    restored = journal.restore(now=manager._clock(), wall=manager._wall())
    for job in restored.finished:
        manager.store.add(job)
        manager.store.finished(job, at=job.finished_mono)
    manager.store.prune()
    for job, held in restored.attached:
        manager._start(job, _follow_again(manager, job, held, session))
    for job in restored.unsent:
        manager._start(job, _send_when_ready(manager, job, session))
    journal.forget(journal.ids() - manager.store.ids())
    if restored.attached or restored.unsent:
        log.info("jobs from the journal: %d followed on their instances, %d to send",
                 len(restored.attached), len(restored.unsent))


async def _until_probed(manager: JobManager, job: Job, index: int) -> InstanceView | None:
    """The instance's view once this monitor has probed it (None: past the job's deadline)."""
    while manager._clock() < job.deadline:
        view = next((v for v in manager.directory.snapshot() if v.index == index), None)
        if view is None or view.state is not InstanceState.STARTING:
            return view
        await asyncio.sleep(manager.tracking.check_interval)
    return None


async def _follow_again(manager: JobManager, job: Job, held: InstanceView, session: aiohttp.ClientSession) -> None:
    manager._inflight[held.index] = manager._inflight.get(held.index, 0) + 1
    try:
        view = await _until_probed(manager, job, held.index) or held
        job.instance = view
        client = ComfyClient(session, view.base_url)
        await manager._outcome(job, follow_again(job, view, client, manager.tracking))
    finally:
        manager._release(held)


async def _send_when_ready(manager: JobManager, job: Job, session: aiohttp.ClientSession) -> None:
    while True:
        try:
            view = manager._route(job, exclude=(), count_refusal=False)
        except RouteError as exc:
            if exc.status == 400 or manager._clock() >= job.deadline:
                manager._fail(job, "instance", f"sent again after a monitor restart: {exc}")
                return
            await asyncio.sleep(manager.tracking.check_interval)
            continue
        await manager._run(job, view, session)
        return
