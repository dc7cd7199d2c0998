"""``start``, ``stop`` and ``restart`` of one instance (by GPU index) or all, through supervisord."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Literal

from orchestrator.core.errors import PlanError, SupervisorError
from orchestrator.core.layout import Layout
from orchestrator.core.plan import Instance, MachinePlan
from orchestrator.core.settings import Settings
from orchestrator.machine.state import applied_plan
from orchestrator.machine.supervisor import Supervisor

Action = Literal["start", "stop", "restart"]


@dataclasses.dataclass(frozen=True)
class Controlled:
    """One program that supervisord finished starting, stopping or restarting."""

    name: str
    action: Action


def select_instances(plan: MachinePlan, target: str) -> list[Instance]:
    """``all`` or one GPU index of the applied plan.

    Raises:
        PlanError: ``target`` is neither ``all`` nor the index of a planned GPU.
    """
    if target == "all":
        return list(plan.instances)
    try:
        index = int(target)
    except ValueError:
        raise PlanError(f"invalid GPU {target!r}: expected a GPU index or `all`") from None
    return [plan.instance(index)]


def control(settings: Settings, action: Action, target: str) -> Iterator[Controlled]:
    """Apply ``action`` to each target in turn, yielding each one as supervisord finishes it.

    Raises:
        SupervisorError: nothing was started here, or supervisord is not running or refused.
        PlanError: a bad ``target``.
    """
    layout = Layout(settings.root)
    plan = applied_plan(layout)
    if plan is None:
        raise SupervisorError("nothing has been started here: run `orchestrator up`")
    names = [i.name for i in select_instances(plan, target)]
    sup = Supervisor(layout, timeout=settings.stop_timeout * 2 + 30)
    sup.require_running()
    for name in names:
        if action == "start":
            sup.start(name)
        elif action == "stop":
            sup.stop(name)
        else:
            sup.restart(name)
        yield Controlled(name, action)
