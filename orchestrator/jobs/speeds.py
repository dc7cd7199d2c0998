"""What the router learns from completed jobs: each instance's speed and the models it holds.

Per instance (GPU index), exponential moving averages of a job's run time without its model
loads, per job class and over all classes, and of the time its loader nodes took when they
ran (not served from cache). Mixed GPUs on one machine thus get different speeds. The models
an instance holds are those of the last job routed to it (ComfyUI keeps the latest prompt's
node results). ``estimate`` hands ``core.routing_score`` the values it ranks by.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from orchestrator.comfy.protocol import NodeTiming
from orchestrator.core.instances import InstanceView
from orchestrator.core.routing import instance_load, route
from orchestrator.core.routing_score import Estimate, JobProfile, explain, rank
from orchestrator.core.settings import Settings
from orchestrator.jobs.schemas import RoutingInfo
from orchestrator.jobs.store import Job

ALPHA = 0.3  # weight of the newest observation in each moving average


def _ewma(old: float | None, value: float, alpha: float) -> float:
    return value if old is None else old + alpha * (value - old)


@dataclasses.dataclass
class _Instance:
    by_class: dict[str, float] = dataclasses.field(default_factory=dict)
    mean: float | None = None
    load: float | None = None
    models: frozenset[str] = frozenset()
    jobs: int = 0


class SpeedBook:
    """Moving averages of run and load time per instance, and the models each one holds."""

    def __init__(self, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self._instances: dict[int, _Instance] = {}

    def _get(self, index: int) -> _Instance:
        return self._instances.setdefault(index, _Instance())

    def routed(self, index: int, job: JobProfile) -> None:
        """A job was sent to the instance: it will hold that job's models next."""
        if job.models:
            self._get(index).models = job.models

    def record(self, index: int, job: JobProfile, run_seconds: float, nodes: Iterable[NodeTiming]) -> None:
        """A job completed on the instance in ``run_seconds`` with these node timings."""
        load = sum(n.seconds for n in nodes if not n.cached and n.id in job.loader_nodes)
        inst = self._get(index)
        compute = max(0.0, run_seconds - load)
        inst.by_class[job.job_class] = _ewma(inst.by_class.get(job.job_class), compute, self.alpha)
        inst.mean = _ewma(inst.mean, compute, self.alpha)
        if load > 0:
            inst.load = _ewma(inst.load, load, self.alpha)
        inst.jobs += 1

    def learn(self, job: Job) -> None:
        """Record a finished job (only a success with a run time teaches anything)."""
        if job.status == "success" and job.instance and job.profile and job.execution_time is not None:
            nodes = job.progress.timings() if job.progress is not None else []
            self.record(job.instance.index, job.profile, job.execution_time, nodes)

    def fleet_seconds(self) -> float:
        """Mean run time over the instances that have completed a job (1 s before any has)."""
        means = [i.mean for i in self._instances.values() if i.mean is not None]
        return sum(means) / len(means) if means else 1.0

    def fleet_load_seconds(self) -> float | None:
        loads = [i.load for i in self._instances.values() if i.load is not None]
        return sum(loads) / len(loads) if loads else None

    def estimate(self, index: int, job: JobProfile) -> Estimate:
        """What is known of the instance for this job (a load time learned elsewhere stands in)."""
        inst = self._instances.get(index) or _Instance()
        return Estimate(
            run_seconds=inst.by_class.get(job.job_class),
            mean_seconds=inst.mean,
            load_seconds=inst.load if inst.load is not None else self.fleet_load_seconds(),
            affine=not job.models or job.models <= inst.models,
        )

    def snapshot(self) -> dict[int, dict[str, float | int | None]]:
        """Per instance: jobs learned from, mean run seconds, model load seconds (for status)."""
        return {i: {"jobs": v.jobs, "mean_seconds": v.mean, "load_seconds": v.load} for i, v in self._instances.items()}


def choose_instance(
    views: Sequence[InstanceView],
    inflight: Mapping[int, int],
    job: JobProfile,
    book: SpeedBook,
    settings: Settings,
    gpu: int | None = None,
    exclude: Iterable[int] = (),
) -> tuple[InstanceView, RoutingInfo]:
    """The instance for a job under ROUTING_POLICY (MAX_QUEUE_DEPTH: ``core.routing.route``) and
    why; it is noted as holding the job's models.

    Raises:
        RouteError: as ``core.routing.route``.
    """
    policy, excluded = settings.routing_policy, set(exclude)
    fleet = book.fleet_seconds()
    estimates = {v.index: book.estimate(v.index, job) for v in views} if policy == "capacity" else {}

    def ranking(v: InstanceView, load: int) -> tuple[float, ...]:
        return rank(load, estimates[v.index], fleet)

    view = route(
        views,
        inflight,
        max_queue_depth=settings.max_queue_depth,
        gpu=gpu,
        exclude=excluded,
        rank=ranking if estimates else None,
    )
    candidates = [(v, instance_load(v, inflight.get(v.index, 0))) for v in views if v.ready and v.index not in excluded]
    reason = explain(policy, view, candidates, estimates, fleet, pinned=gpu is not None)
    book.routed(view.index, job)
    return view, RoutingInfo(instance=view.name, policy="pinned" if gpu is not None else policy, reason=reason)
