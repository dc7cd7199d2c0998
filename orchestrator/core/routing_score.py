"""Capacity and affinity routing: which READY instance will finish a job first. Pure.

An instance's expected finish time for a job is::

    jobs ahead x its mean run time per job  +  this job class's run time there
      +  a model load there, unless its last job used the same model files (affinity)

Run times and load times are learned from completed jobs (``jobs.speeds``) and passed in as
:class:`Estimate` values; what is not learned yet falls back to the fleet's mean, so a fleet
with nothing learned routes by queue depth. ``core.routing.route`` takes the score as its
ranking; ``explain`` writes the reason a job's result shows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.core.instances import InstanceView

POLICIES = ("capacity", "least_queue")
# Inputs that name a model file a loader reads (checkpoints, LoRAs, VAEs, text encoders...).
MODEL_INPUTS = frozenset(
    {
        "ckpt_name",
        "lora_name",
        "unet_name",
        "vae_name",
        "clip_name",
        "clip_name1",
        "clip_name2",
        "control_net_name",
        "model_name",
        "style_model_name",
        "gligen_name",
    }
)


@dataclasses.dataclass(frozen=True)
class JobProfile:
    """What routing needs to know about a job's workflow."""

    job_class: str  # hash of its node classes and model files: jobs alike take alike time
    models: frozenset[str]  # model files its loaders read
    loader_nodes: frozenset[str]  # ids of the nodes that read them


def profile(workflow: Mapping[str, Mapping[str, Any]]) -> JobProfile:
    """The job class, model files and loader nodes of an API-format workflow."""
    models: set[str] = set()
    loaders: set[str] = set()
    classes: list[str] = []
    for node_id, node in workflow.items():
        classes.append(str(node.get("class_type", "")))
        inputs = node.get("inputs")
        for key, value in (inputs.items() if isinstance(inputs, Mapping) else ()):
            if key in MODEL_INPUTS and isinstance(value, str) and value:
                models.add(value)
                loaders.add(str(node_id))
    text = "\n".join(sorted(classes)) + "\n--\n" + "\n".join(sorted(models))
    return JobProfile(hashlib.sha256(text.encode()).hexdigest()[:12], frozenset(models), frozenset(loaders))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What is known about one instance for one job (seconds; None: not learned yet)."""

    run_seconds: float | None = None  # this job class's run time there (model loads excluded)
    mean_seconds: float | None = None  # mean run time of any job there (for the jobs ahead)
    load_seconds: float | None = None  # a model load there
    affine: bool = False  # its last job used this job's model files (or the job uses none)


def finish_seconds(load: int, estimate: Estimate, fleet_seconds: float) -> float:
    """Expected seconds until the job is done on an instance with ``load`` jobs ahead.

    ``fleet_seconds``: the fleet's mean run time, used where the instance has nothing learned.
    """
    run = estimate.run_seconds if estimate.run_seconds is not None else estimate.mean_seconds
    run = fleet_seconds if run is None else run
    ahead = estimate.mean_seconds if estimate.mean_seconds is not None else run
    reload = 0.0 if estimate.affine else (estimate.load_seconds or 0.0)
    return max(0, load) * ahead + run + reload


def rank(load: int, estimate: Estimate, fleet_seconds: float) -> tuple[float, ...]:
    """The ranking key of an instance (smaller first): finish time, then affinity, then one not
    measured yet (so an idle fleet tries each instance once and learns its speed)."""
    learned = estimate.mean_seconds is not None
    return (round(finish_seconds(load, estimate, fleet_seconds), 6), 0.0 if estimate.affine else 1.0, float(learned))


def explain(
    policy: str,
    chosen: InstanceView,
    candidates: Sequence[tuple[InstanceView, int]],
    estimates: Mapping[int, Estimate],
    fleet_seconds: float,
    *,
    pinned: bool = False,
) -> str:
    """One line: why ``chosen`` got the job (``candidates``: READY instances and their loads)."""
    loads = {v.index: load for v, load in candidates}
    if pinned:
        return f"gpu {chosen.index} was requested (pinned); {loads.get(chosen.index, 0)} job(s) ahead"
    if policy != "capacity":
        others = ", ".join(f"GPU {v.index}: {n}" for v, n in candidates if v.index != chosen.index)
        return f"fewest jobs ahead ({loads.get(chosen.index, 0)})" + (f"; {others}" if others else "")

    def describe(view: InstanceView) -> str:
        est = estimates.get(view.index, Estimate())
        done = finish_seconds(loads.get(view.index, 0), est, fleet_seconds)
        model = "; models loaded" if est.affine else ""
        return f"GPU {view.index} done in ~{done:.2f} s ({loads.get(view.index, 0)} ahead{model})"

    rest = [describe(v) for v, _ in candidates if v.index != chosen.index]
    return "earliest expected finish: " + describe(chosen) + (f"; vs {', '.join(rest)}" if rest else "")
