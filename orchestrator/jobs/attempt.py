"""One attempt: a job sent to one instance and followed to its end.

::

    /ws?clientId (adopt the fork's own client_id) ─► /upload/image ─► POST /prompt
      ─► follow (events, backed by /history) ─► outputs from /history (+ /view for base64)
      └► past the deadline: where is it in /queue? queued: deleted from the queue; running:
         POST /interrupt {prompt_id} (only ours: another client's prompt is never touched), then
         :func:`confirm_stopped` watches it leave the queue for JOB_INTERRUPT_GRACE and only then
         reports the instance hung (the monitor restarts it)

An instance that goes away raises :class:`~orchestrator.jobs.follow.Down` (``started`` says
whether resubmitting is safe); one that refuses the workflow raises :class:`Rejected`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Awaitable

from orchestrator.comfy.client import ComfyCallError, ComfyClient, ComfySocket, describe
from orchestrator.comfy.protocol import (
    NodeProgress,
    history_outcome,
    history_outputs,
    history_times,
    node_classes,
    prompt_rejection,
)
from orchestrator.core.instances import InstanceView
from orchestrator.jobs.follow import Down, Outcome, Tracking, ended, follow, gone
from orchestrator.jobs.schemas import JobErrorInfo, OutputFile, error_info, output_file
from orchestrator.jobs.store import FinalStatus, Job

log = logging.getLogger(__name__)

SUBMIT_TIMEOUT = 30.0  # seconds for the ws handshake, uploads and POST /prompt together
STOP_CALL_TIMEOUT = 3.0  # seconds for POST /interrupt or /queue at the deadline (best effort)
CONFIRM_INTERVAL = 0.25  # seconds between /queue reads while an interrupt is awaited
_HISTORY_RETRIES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)  # seconds between /history reads


class Rejected(Exception):  # noqa: N818 - an outcome: the instance refused the workflow
    def __init__(self, info: JobErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


@dataclasses.dataclass(frozen=True)
class Result:
    """How the attempt ended (the manager records it on the job)."""

    status: FinalStatus
    error: JobErrorInfo | None = None
    # The prompt was interrupted at its deadline: the caller watches it stop (confirm_stopped).
    interrupted: bool = False


async def run_attempt(job: Job, view: InstanceView, client: ComfyClient, t: Tracking) -> Result:
    """Send the job to one instance and follow it to a final state.

    Raises:
        Down: the instance went away (``started`` False: safe to resubmit).
        Rejected: the instance refused the workflow.
    """
    socket: ComfySocket | None = None
    try:
        try:
            async with asyncio.timeout(min(SUBMIT_TIMEOUT, max(0.0, job.deadline - t.clock()))):
                own = uuid.uuid4().hex
                # Connect before queueing so no event of our prompt can be missed.
                try:
                    socket = await client.connect(own, greet=False)
                except ComfyCallError:
                    socket = None
                if socket is not None and t.dialects.get(view.index) != "upstream":
                    # The fork ignores ?clientId= and names its own id: post with that one.
                    socket.client_id, socket.dialect = await socket.read_greeting()
                    if socket.dialect:
                        t.dialects[view.index] = socket.dialect
                    if socket.client_id != own:
                        log.debug("job %s: %s assigned client id %s", job.id, view.name, socket.client_id)
                await _upload_images(job, view, client)
                job.prompt_id = await _post_prompt(job, view, client, own if socket is None else socket.client_id)
                job.progress = NodeProgress(total=len(job.workflow), class_types=node_classes(job.workflow))
        except TimeoutError:
            if t.clock() < job.deadline:
                raise Down(
                    f"{view.name} (GPU {view.index}) did not take the prompt within {SUBMIT_TIMEOUT:g} s",
                    started=False,
                ) from None
            # Not the instance's fault: a short deadline must never get an instance restarted
            # (a slow or dead one is the monitor's to judge, through its probes).
            reason = f"{view.name} did not accept job {job.id} within its {job.timeout:g} s deadline"
            return Result("timeout", JobErrorInfo(type="timeout", message=reason))
        job.status = "queued"
        t.saved(job)
        outcome = await follow(job, view, client, socket, t)
    finally:
        if socket is not None:
            await socket.close()
    return await _conclude(job, view, client, t, outcome)


async def follow_again(job: Job, view: InstanceView, client: ComfyClient, t: Tracking) -> Result:
    """Follow a prompt an earlier monitor sent (known from the journal) to its end, by /history.

    Raises:
        Down: the instance went away or lost the prompt.
    """
    return await _conclude(job, view, client, t, await follow(job, view, client, None, t))


async def settled(job: Job, work: Awaitable[Result]) -> Result:
    """How an attempt ended, whatever it raised (a cancellation goes on up)."""
    try:
        return await work
    except Down as down:
        return Result("error", JobErrorInfo(type="instance", message=down.reason))
    except Rejected as rejected:
        return Result("error", rejected.info)
    except (ComfyCallError, OSError, ValueError) as exc:
        name = job.instance.name if job.instance else "the instance"
        reason = exc.reason if isinstance(exc, ComfyCallError) else describe(exc)
        return Result("error", JobErrorInfo(type="internal", message=f"talking to {name}: {reason}"))


async def _conclude(job: Job, view: InstanceView, client: ComfyClient, t: Tracking, outcome: Outcome) -> Result:
    if outcome.kind == "done":
        return await _collect(job, view, client)
    if outcome.kind == "timeout":
        return await _stop_at_deadline(job, view, client, t)
    return Result("error", outcome.error)


async def _upload_images(job: Job, view: InstanceView, client: ComfyClient) -> None:
    for name, data in job.images:
        try:
            reply = await client.upload_image(name, data)
        except ComfyCallError as exc:
            raise Down(
                f"{view.name} (GPU {view.index}) unreachable while uploading {name}: {exc.reason}", started=False
            ) from None
        if reply.status != 200:
            raise Rejected(
                JobErrorInfo(
                    type="validation",
                    field="images",
                    message=f"{view.name} refused input image {name}: HTTP {reply.status} {reply.text[:200]}",
                )
            )


async def _post_prompt(job: Job, view: InstanceView, client: ComfyClient, client_id: str) -> str:
    try:
        reply = await client.post_prompt(job.workflow, client_id)
    except ComfyCallError as exc:
        raise Down(f"{view.name} (GPU {view.index}) unreachable: {exc.reason}", started=False) from None
    try:
        body = reply.json() if reply.body else None
    except ValueError:
        body = None
    if reply.status == 400:
        raise Rejected(error_info(prompt_rejection(body, job.workflow)))
    if reply.status != 200 or not isinstance(body, dict) or not body.get("prompt_id"):
        raise Down(f"{view.name} (GPU {view.index}) answered POST /prompt with HTTP {reply.status}", started=False)
    if body.get("node_errors"):
        raise Rejected(error_info(prompt_rejection(body, job.workflow)))
    return str(body["prompt_id"])


async def _collect(job: Job, view: InstanceView, client: ComfyClient) -> Result:
    """Outputs from /history (retried briefly: ComfyUI stores it just after the last event)."""
    entry = None
    for delay in _HISTORY_RETRIES:
        if delay:
            await asyncio.sleep(delay)
        try:
            entry = await client.history(job.prompt_id or "")
        except ComfyCallError as exc:
            raise Down(
                f"{view.name} (GPU {view.index}) went away before its outputs were read: {exc.reason}",
                started=True,
            ) from None
        if entry is not None:
            break
    if entry is None:
        message = f"{view.name} finished prompt {job.prompt_id} but has no history for it"
        return Result("error", JobErrorInfo(type="internal", message=message))
    event = history_outcome(entry)
    if event.kind in {"error", "interrupted"}:
        return Result("error", None if event.error is None else error_info(event.error))
    if job.execution_time is None and job.started_mono is not None and job.ended_mono is not None:
        job.execution_time = job.ended_mono - job.started_mono
    if job.execution_time is None:
        job.execution_time = history_times(entry)
    outputs = [output_file(ref) for ref in history_outputs(entry)]
    if job.return_mode == "base64":
        outputs = list(await asyncio.gather(*(_fetch_data(view, client, f) for f in outputs)))
    job.outputs = outputs
    return Result("success")


async def _fetch_data(view: InstanceView, client: ComfyClient, item: OutputFile) -> OutputFile:
    try:
        data = await client.view(item.filename, item.subfolder, item.type)
    except ComfyCallError as exc:
        raise Down(
            f"{view.name} (GPU {view.index}) failed to serve output {item.filename}: {exc.reason}", started=True
        ) from None
    return item.model_copy(update={"data": base64.b64encode(data).decode()})


async def _where(client: ComfyClient, prompt_id: str) -> str:
    """running | pending | missing | unknown (the instance did not answer)."""
    try:
        return await client.queue_position(prompt_id, STOP_CALL_TIMEOUT)
    except ComfyCallError:
        return "unknown"


async def _stop_at_deadline(job: Job, view: InstanceView, client: ComfyClient, t: Tracking) -> Result:
    """Past its deadline: dequeue the prompt (still queued) or interrupt it (executing).

    Only our prompt is touched: one still queued behind another client's prompt is deleted from
    the queue, never interrupted (an interrupt would stop whatever runs). The instance is not
    blamed here; :func:`confirm_stopped` reports it hung only if the interrupt does not take.
    """
    prompt_id = job.prompt_id or ""
    where = await _where(client, prompt_id)
    try:
        if where == "pending":
            await client.delete_queued([prompt_id], STOP_CALL_TIMEOUT)
            if await _where(client, prompt_id) == "running":
                where = "running"  # it started meanwhile: interrupt it below
        if where == "running" or (where == "unknown" and job.started_mono is not None):
            # The prompt_id makes it targeted (ComfyUI 0.3.64 and the simulator interrupt only when
            # it is the running prompt); an older server interrupts whatever runs, which /queue
            # just said is ours.
            where = "running"
            await client.interrupt(prompt_id, STOP_CALL_TIMEOUT)
    except ComfyCallError as exc:
        log.warning("job %s: could not stop prompt %s on %s: %s", job.id, prompt_id, view.name, exc.reason)
    if where == "missing":
        entry = None
        with contextlib.suppress(ComfyCallError):
            entry = await client.history(prompt_id, STOP_CALL_TIMEOUT)
        if entry is not None and ended(job, entry, t.clock()).kind == "done":
            return await _collect(job, view, client)  # it finished as its deadline passed
    how = {
        "running": "while executing; interrupted",
        "pending": "while still queued; removed from the queue",
        "missing": "as it left the queue",
    }.get(where, "while still queued; the instance did not answer to remove it")
    reason = f"job {job.id} (prompt {prompt_id}) ran past its {job.timeout:g} s deadline {how}"
    return Result("timeout", JobErrorInfo(type="timeout", message=f"{reason} on {view.name}"), where == "running")


async def confirm_stopped(job: Job, view: InstanceView, client: ComfyClient, t: Tracking, grace: float) -> bool:
    """After an interrupt at the deadline: True once the prompt left the queue within ``grace`` s.

    Otherwise (still running, or the instance stopped answering) the instance is reported hung
    and the monitor restarts it. Jobs of other clients on the instance are never failed here.
    """
    prompt_id = job.prompt_id or ""
    until = t.clock() + grace
    while True:
        if gone(view, t.directory):
            return False  # the monitor is restarting it already
        if await _where(client, prompt_id) in {"missing", "pending"}:
            return True
        if t.clock() >= until:
            break
        await asyncio.sleep(min(CONFIRM_INTERVAL, max(0.0, until - t.clock())))
    reason = (
        f"prompt {prompt_id} of job {job.id} still runs (or /queue does not answer) {grace:g} s after "
        f"it was interrupted at its {job.timeout:g} s deadline (JOB_INTERRUPT_GRACE)"
    )
    log.warning("job %s: %s on %s; reporting the instance hung", job.id, reason, view.name)
    t.directory.report_hung(view.index, reason)
    return False
