"""Job routing: the least-busy READY instance for a job, and when every one is full. Pure."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from orchestrator.core.errors import JobError
from orchestrator.core.instances import InstanceView


class RouteError(JobError):
    """No instance can take the job; ``status`` is the HTTP code, ``reason`` a short word."""

    def __init__(self, message: str, *, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def instance_load(view: InstanceView, own_inflight: int) -> int:
    """Prompts queued or running on an instance.

    The probe's queue counts include our own jobs once the probe has seen them, and our own
    in-flight count includes jobs submitted since the last probe; the larger of the two is
    the best estimate (adding them would count each of our jobs twice once a probe ran).
    """
    return max(view.queue_pending + view.queue_running, own_inflight)


def route(
    views: Sequence[InstanceView],
    inflight: Mapping[int, int],
    *,
    max_queue_depth: int,
    gpu: int | None = None,
    exclude: Iterable[int] = (),
    rank: Callable[[InstanceView, int], tuple[float, ...]] | None = None,
) -> InstanceView:
    """The READY instance with the least load (ties: lowest GPU index).

    ``rank(view, load)``, when given, orders the instances that have room instead of their load
    (``core.routing_score``: capacity and affinity); full ones still come last.

    Raises:
        RouteError: 400 for an unknown ``gpu``; 503 when the pinned instance is not ready,
            none is ready, or every candidate has ``max_queue_depth`` or more.
    """
    excluded = set(exclude)
    if gpu is not None:
        pinned = [v for v in views if v.index == gpu]
        if not pinned:
            known = ", ".join(str(v.index) for v in views) or "none"
            raise RouteError(
                f"gpu {gpu} is not an instance on this machine (GPUs: {known})",
                status=400,
                reason="validation",
            )
        view = pinned[0]
        if not view.ready or view.index in excluded or view.fenced:
            why = view.fenced or f"{view.state.value}, not READY"
            raise RouteError(
                f"gpu {gpu} ({view.name}) is {why}; retry later or leave gpu out",
                status=503,
                reason="not_ready",
            )
        if instance_load(view, inflight.get(view.index, 0)) >= max_queue_depth:
            raise RouteError(
                f"gpu {gpu} ({view.name}) has {max_queue_depth} or more jobs (MAX_QUEUE_DEPTH); retry later",
                status=503,
                reason="saturated",
            )
        return view
    ready = [v for v in views if v.ready and v.index not in excluded and not v.fenced]
    if not ready:
        states = ", ".join(f"{v.index}:{'FENCED' if v.fenced else v.state.value}" for v in views) or "no instances"
        raise RouteError(f"no READY instance to run the job ({states})", status=503, reason="no_instance")
    loads = [(instance_load(v, inflight.get(v.index, 0)), v.index, v) for v in ready]
    key = rank or (lambda v, n: (float(n),))
    load, _, best = min(loads, key=lambda t: (t[0] >= max_queue_depth, key(t[2], t[0]), t[1]))
    if load >= max_queue_depth:
        raise RouteError(
            f"every READY instance has {max_queue_depth} or more jobs (MAX_QUEUE_DEPTH); retry later",
            status=503,
            reason="saturated",
        )
    return best


def all_saturated(views: Sequence[InstanceView], inflight: Mapping[int, int], max_queue_depth: int) -> bool:
    """True when at least one instance is READY and every READY one has ``max_queue_depth`` or more."""
    ready = [v for v in views if v.ready and not v.fenced]
    return bool(ready) and all(instance_load(v, inflight.get(v.index, 0)) >= max_queue_depth for v in ready)
