"""Autoscaling signals: one machine's load as four numbers. Pure.

Named after what operators already scale on (vLLM's ``num_requests_waiting`` /
``num_requests_running``, Triton's pending request count), these are the same numbers in
``/metrics`` (``comfyui_machine_*``), in ``GET /scaling`` (KEDA's metrics-api scaler) and in the
fleet's status, because they all come from :func:`machine_load`.

Per instance the load is the job router's (:func:`orchestrator.core.routing.instance_load`: the
larger of the probe's queue and the jobs the job API has sent there). ComfyUI executes one
prompt at a time, so an instance with load ``n > 0`` runs one and has ``n - 1`` waiting.
``free_slots`` counts the jobs the machine would accept now: ``MAX_QUEUE_DEPTH`` minus the load
of each READY instance, and 0 everywhere while the machine drains (it accepts nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.core.instances import InstanceView
from orchestrator.core.routing import instance_load


@dataclasses.dataclass(frozen=True)
class MachineLoad:
    """What an autoscaler needs to know about one machine."""

    jobs_waiting: int  # accepted or queued, not executing yet
    jobs_running: int  # executing now (at most one per instance)
    free_slots: int  # jobs the machine would accept now
    ready_instances: int
    instances: int
    max_queue_depth: int
    draining: bool = False  # shutting down: refuses new jobs, finishes the running ones

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def machine_load(
    views: Sequence[InstanceView],
    inflight: Mapping[int, int],
    max_queue_depth: int,
    *,
    draining: bool = False,
) -> MachineLoad:
    """The machine's load from the monitor's instance views and the job API's in-flight counts."""
    waiting = running = free = ready = 0
    for view in views:
        load = instance_load(view, inflight.get(view.index, 0))
        busy = min(load, 1)
        running += busy
        waiting += load - busy
        if view.ready:
            ready += 1
            free += max(0, max_queue_depth - load)
    return MachineLoad(
        jobs_waiting=waiting,
        jobs_running=running,
        free_slots=0 if draining else free,
        ready_instances=ready,
        instances=len(views),
        max_queue_depth=max_queue_depth,
        draining=draining,
    )
