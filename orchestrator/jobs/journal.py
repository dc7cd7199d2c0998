"""The job journal: every accepted job as one small JSON file, so a monitor that is killed and
restarted by supervisord knows the jobs it had accepted.

A record is written when a job is accepted (with what is needed to send it again: the patched
workflow and its input images), when its instance has the prompt (the prompt id, which is what
the next monitor follows on that instance's /history), and when it ends (the response clients
read). Records of finished jobs go when the results store drops them (JOB_RESULTS_TTL /
JOB_RESULTS_MAX). Each write is atomic (temp file + rename) without fsync: the journal is for a
killed process, whose writes the kernel keeps; a power loss loses the instances' work anyway.
Files are 0600: workflows may carry prompts and URLs that are nobody else's business.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.comfy.protocol import NodeProgress
from orchestrator.core.instances import InstanceView
from orchestrator.core.states import InstanceState
from orchestrator.jobs.schemas import FINAL_STATUSES, JobResponse
from orchestrator.jobs.store import Job
from orchestrator.machine.fs import atomic_write, read_json

log = logging.getLogger(__name__)

VERSION = 1
_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclasses.dataclass(frozen=True)
class Restored:
    """Jobs read back from the journal, by what the manager does with them."""

    finished: list[Job]  # final: served from the results store as before
    attached: list[tuple[Job, InstanceView]]  # their instance has the prompt: follow it there
    unsent: list[Job]  # accepted, never sent (or not known to be): send them


class JobJournal:
    """One JSON file per job under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.json"

    def record(self, job: Job) -> None:
        """Write the job's record now (best effort: a full disk is logged, never raised)."""
        body: dict[str, Any] = {"version": VERSION, "response": job.to_response().model_dump(mode="json")}
        if not job.final:
            body["request"] = {
                "workflow": job.workflow,
                "images": [[name, base64.b64encode(data).decode()] for name, data in job.images],
                "return_mode": job.return_mode,
                "gpu": job.gpu,
                "timeout": job.timeout,
            }
        try:
            atomic_write(self.path(job.id), json.dumps(body, sort_keys=True), mode=0o600, durable=False)
        except OSError as exc:
            log.warning("job %s: could not write its journal record under %s: %s", job.id, self.directory, exc)

    def forget(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            with contextlib.suppress(FileNotFoundError):
                self.path(job_id).unlink()

    def ids(self) -> set[str]:
        try:
            return {p.stem for p in self.directory.glob("*.json") if _ID.match(p.stem)}
        except OSError:
            return set()

    def restore(self, *, now: float, wall: float) -> Restored:
        """Every readable record as a :class:`Job` (``now`` monotonic, ``wall`` unix seconds).

        A damaged record is logged in one line naming its file and set aside (renamed
        ``.damaged``), never raised: one bad file must not keep the job API from starting.
        """
        finished: list[Job] = []
        attached: list[tuple[Job, InstanceView]] = []
        unsent: list[Job] = []
        for job_id in sorted(self.ids()):
            path = self.path(job_id)
            try:
                job = _job(read_json(path), now=now, wall=wall)
            except (ValueError, TypeError, KeyError, ValidationError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("%s is damaged (%s); set aside as %s.damaged", path, first, path.name)
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".damaged"))
                continue
            if job.final:
                finished.append(job)
            elif job.prompt_id and job.instance is not None:
                attached.append((job, job.instance))
            else:
                unsent.append(job)
        finished.sort(key=lambda j: j.finished_at or 0.0)
        return Restored(finished, attached, unsent)


def _job(body: Any, *, now: float, wall: float) -> Job:
    """The job a record describes; raises ValueError (or a pydantic error) for a damaged one."""
    if not isinstance(body, dict) or body.get("version") != VERSION:
        raise ValueError("not a job record of this version")
    r = JobResponse.model_validate(body["response"])
    if not _ID.match(r.id):
        raise ValueError(f"bad job id {r.id!r}")
    request = body.get("request")
    if r.status not in FINAL_STATUSES and not isinstance(request, dict):
        raise ValueError("an unfinished job without its request")
    request = request or {}

    def mono(at: float) -> float:  # a unix time as a reading of this process's monotonic clock
        return now - (wall - at)

    created_mono = mono(r.created_at)
    timeout = float(request.get("timeout") or r.total_seconds or 0.0)
    job = Job(
        id=r.id,
        workflow=dict(request.get("workflow") or {}),
        images=[(str(name), base64.b64decode(data)) for name, data in request.get("images") or []],
        return_mode=request.get("return_mode") or "filenames",
        gpu=request.get("gpu"),
        timeout=timeout,
        created_at=r.created_at,
        created_mono=created_mono,
        deadline=created_mono + timeout,
        status=r.status,
        prompt_id=r.prompt_id,
        outputs=list(r.outputs),
        error=r.error,
        execution_time=r.execution_time_seconds,
        attempts=r.attempts,
    )
    if r.instance is not None:
        job.instance = InstanceView(r.instance.gpu, r.instance.name, r.instance.port, InstanceState.STARTING)
    if r.queue_wait_seconds is not None:
        job.started_mono = created_mono + r.queue_wait_seconds
    if r.progress is not None:
        job.progress = NodeProgress(total=r.progress.nodes_total)
        job.progress.done_nodes = {f"restored-{n}" for n in range(r.progress.nodes_done)}
    if r.finished_at is not None:
        job.finished_at = r.finished_at
        job.finished_mono = mono(r.finished_at)
    job.routing = r.routing
    if job.final:
        job.answer = r
        job.done.set()
    return job
