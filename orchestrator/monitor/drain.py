"""Drain: stop routing new jobs to an instance and wait until the prompts it holds are done.

The one primitive a rolling restart (``lifecycle.rolling``) and any other planned restart use:

    result = await drainer.drain(slot, timeout)   # DrainResult
    drainer.undrain(slot)                          # route to it again

While a :class:`~orchestrator.monitor.slots.DrainMark` is on a slot, the job router gets no new job for that process
(``Slot.routing_closed``) and ``/readyz`` counts it as not ready but as *planned* out, so with the
default MIN_READY_INSTANCES (all) a machine rolling one instance keeps answering 200 (see
``InstanceStatus.planned_out`` in ``core.readiness``). The mark ends when the instance is READY again on a
new process (it was restarted), on :meth:`Drainer.undrain`, or ``hold`` seconds after it was set
(whoever drained it went away). Waiting means: no job of ours in flight there, and a probe taken
after the drain began shows an empty ComfyUI queue (prompts from other clients count too). At the
timeout the queue is cleared and the running prompt interrupted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from orchestrator.comfy.client import ComfyCallError, ComfyClient, base_url
from orchestrator.core.states import InstanceState
from orchestrator.monitor.slots import DrainMark, Slot

log = logging.getLogger(__name__)

POLL = 0.1  # seconds between looks while waiting


@dataclasses.dataclass(frozen=True)
class DrainResult:
    """How a drain ended: ``drained`` when nothing was left before the timeout; otherwise what was
    ``interrupted`` (prompts cleared or stopped); ``waited`` seconds."""

    gpu: int
    name: str
    drained: bool
    interrupted: int
    waited: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Drainer:
    """Drains instances of the monitor (one per monitor; holds nothing but its collaborators).

    Args:
        inflight: the job manager's jobs in flight per GPU index ({} when there is no job API).
        session: the HTTP session to talk to instances (the prober's).
        clock: monotonic seconds; hold: how long a mark lasts past its drain at most.
        wake: asks the probe loop for a tick now.
    """

    def __init__(
        self, inflight: Callable[[], Mapping[int, int]], session: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float], hold: float, wake: Callable[[], None],
    ) -> None:
        self.inflight = inflight
        self.session = session
        self.clock = clock
        self.hold = hold
        self.wake = wake

    def _empty(self, slot: Slot, since: float) -> bool:
        if self.inflight().get(slot.instance.index, 0) > 0:
            return False
        proc = slot.proc
        if proc is None or not proc.pid or slot.record.state not in (InstanceState.READY, InstanceState.UNHEALTHY):
            return True  # no process that could hold prompts
        rec = slot.record
        fresh = rec.last_probe is not None and rec.last_probe >= since
        return fresh and not (rec.queue_pending or 0) and not (rec.queue_running or 0)

    async def drain(self, slot: Slot, timeout: float, *, interrupt: bool = True) -> DrainResult:
        """Take ``slot`` out of routing and wait until it holds no prompt (at most ``timeout`` s).

        At the timeout its prompts are interrupted, or with ``interrupt=False`` (a recycle, which
        never cuts a job) the drain is given up: the instance is routed to again, ``drained`` False.
        """
        start = self.clock()
        slot.drain = DrainMark(slot.proc.pid if slot.proc else None, start, start + timeout + self.hold)
        slot.next_due = 0.0  # probe it now, and each tick while drained (ProbeLoop)
        self.wake()
        log.info("%s: draining (up to %gs)", slot.instance.name, timeout)
        await asyncio.sleep(0)
        while not self._empty(slot, start):
            if self.clock() - start >= timeout and not interrupt:
                self.undrain(slot)
                log.warning("%s: drain given up after %gs: its prompts left to finish", slot.instance.name, timeout)
                return DrainResult(slot.instance.index, slot.instance.name, False, 0, round(self.clock() - start, 3))
            if self.clock() - start >= timeout:
                cleared = await self._interrupt(slot)
                log.warning("%s: drain timed out after %gs: %d prompt(s) interrupted",
                            slot.instance.name, timeout, cleared)
                return DrainResult(slot.instance.index, slot.instance.name, False, cleared,
                                   round(self.clock() - start, 3))
            await asyncio.sleep(POLL)
        waited = round(self.clock() - start, 3)
        log.info("%s: drained in %.2fs", slot.instance.name, waited)
        return DrainResult(slot.instance.index, slot.instance.name, True, 0, waited)

    def undrain(self, slot: Slot) -> None:
        """Route jobs to ``slot`` again (the restart is done, or was given up)."""
        if slot.drain is not None:
            log.info("%s: back in routing", slot.instance.name)
        slot.drain = None

    async def _interrupt(self, slot: Slot) -> int:
        """Clear the queue and interrupt the running prompt; returns how many prompts that was."""
        rec = slot.record
        count = (rec.queue_pending or 0) + (rec.queue_running or 0)
        client = ComfyClient(self.session(), base_url("127.0.0.1", slot.instance.port))
        try:
            await client.request("POST", "/queue", timeout=5, json={"clear": True})
            await client.interrupt(timeout=5)
        except ComfyCallError as exc:
            log.warning("%s: interrupting at the drain timeout failed: %s", slot.instance.name, exc)
        return count
