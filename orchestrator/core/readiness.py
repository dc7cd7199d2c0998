"""What the monitor shows of its instances and GPUs, and the readiness and liveness answers.

:class:`InstanceStatus` is one instance as the API, the metrics and the job router see it (epoch
times, redacted reason); :func:`readiness` turns the statuses into the ``/readyz`` answer. The
state machine that produces the states is :mod:`orchestrator.core.health`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from orchestrator.core.states import InstanceState, ProcessState

if TYPE_CHECKING:  # types only: `orchestrator health` must import fast
    from orchestrator.core.gpufaults import GpuHealth
    from orchestrator.core.gpus import Gpu, GpuSample


@dataclasses.dataclass(frozen=True)
class InstanceStatus:
    """One instance as the API, the metrics and the job router see it (epoch times)."""

    gpu: int
    name: str
    port: int
    state: InstanceState
    reason: str
    since: float  # epoch seconds the state was entered
    process_state: str  # supervisord's state name, UNKNOWN when it did not answer
    pid: int | None
    start_time: float | None  # epoch seconds the running process started
    uptime: float | None  # seconds
    restarts: int
    failed_custom_nodes: tuple[str, ...]
    queue_pending: int | None
    queue_running: int | None
    last_probe: float | None  # epoch seconds
    probe_duration: float | None  # seconds
    device: str | None
    comfyui_version: str | None = None  # system.comfyui_version of the running process
    generation: str | None = None  # the generation its process started with (core.generation)
    current_generation: str | None = None  # the one the last `up` applied
    draining: bool = False  # no new jobs: drained for a planned restart
    planned_out: bool = False  # drained or restarting after a drain (readiness does not require it)

    @property
    def current(self) -> bool:
        """Whether it runs the generation the last ``up`` applied (True when none was recorded)."""
        return self.current_generation is None or self.generation == self.current_generation

    @property
    def up(self) -> bool:
        return self.process_state == ProcessState.RUNNING.name

    @property
    def ready(self) -> bool:
        return self.state is InstanceState.READY and not self.draining

    @property
    def queue_depth(self) -> int:
        return (self.queue_pending or 0) + (self.queue_running or 0)


@dataclasses.dataclass(frozen=True)
class GpuStatus:
    """The latest telemetry of one GPU (``sample`` is None until the first read succeeds)."""

    gpu: Gpu
    sample: GpuSample | None
    sampled_at: float | None  # epoch seconds
    health: GpuHealth | None = None  # what its fault events add up to (None: not watched)


@dataclasses.dataclass(frozen=True)
class Readiness:
    """The ``/readyz`` answer."""

    ready: bool
    ready_count: int
    required: int
    reason: str
    instances: tuple[InstanceStatus, ...]


@dataclasses.dataclass(frozen=True)
class Liveness:
    """The ``/healthz`` answer: the probe loop runs and supervisord answers."""

    alive: bool
    supervisord: bool
    last_cycle_age: float | None  # seconds since the last supervisord poll answered
    reason: str


def readiness(
    statuses: Sequence[InstanceStatus],
    min_ready: int | None,
    *,
    saturation: bool = False,
    max_queue_depth: int = 8,
    inflight: Mapping[int, int] | None = None,
    supervisord_down: str = "",
) -> Readiness:
    """Ready when at least ``min_ready`` (default: all) instances are READY and supervisord answers.

    ``supervisord_down``: why supervisord does not answer ("" when it does). Without it nothing
    restarts a failing instance, and its instances may be gone (they die with it): never ready.

    With ``saturation``, also not ready while every READY instance holds ``max_queue_depth`` or
    more jobs (queue depth from the probes, or jobs in flight from the job manager).
    """
    # A MIN_READY_INSTANCES above the number of planned instances means "all of them"; by default
    # (all) an instance planned out (drained for a rolling restart) is not required.
    planned = sum(1 for s in statuses if s.planned_out)
    wanted = len(statuses) - planned if min_ready is None else min_ready
    required = max(1, min(wanted, len(statuses)))
    ready = [s for s in statuses if s.ready]
    if supervisord_down:
        return Readiness(False, len(ready), required, supervisord_down, tuple(statuses))
    if len(ready) < required:
        names = ", ".join(f"{s.name} {s.state.value}: {s.reason}" for s in statuses if not s.ready)
        reason = f"{len(ready)}/{required} READY; {names}"
        return Readiness(False, len(ready), required, reason, tuple(statuses))
    if saturation and ready:
        inflight = inflight or {}
        depth = {s.gpu: max(s.queue_depth, inflight.get(s.gpu, 0)) for s in ready}
        if all(d >= max_queue_depth for d in depth.values()):
            return Readiness(
                False, len(ready), required,
                f"every READY instance holds {max_queue_depth}+ jobs (MAX_QUEUE_DEPTH)", tuple(statuses),
            )
    return Readiness(True, len(ready), required, f"{len(ready)}/{len(statuses)} READY", tuple(statuses))
