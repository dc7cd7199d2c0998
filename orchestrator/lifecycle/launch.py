"""The last stages of ``up``: render supervisord.conf, then start supervisord or reconcile it.

Each stage is a function that takes values and returns one; ``lifecycle.up`` runs them in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from orchestrator.core.errors import SupervisorError
from orchestrator.core.layout import Layout
from orchestrator.core.plan import MachinePlan
from orchestrator.core.render import Program, RenderOptions, render_supervisord_conf
from orchestrator.core.settings import Settings
from orchestrator.machine import runner as subproc
from orchestrator.machine.clock import wait_for
from orchestrator.machine.fs import atomic_write, write_json
from orchestrator.machine.ports import check_ports, family
from orchestrator.machine.state import create_instance_dirs
from orchestrator.machine.supervisor import Supervisor, read_credentials

log = logging.getLogger(__name__)

Execve = Callable[[str, list[str], dict[str, str]], None]


@dataclasses.dataclass(frozen=True)
class Changes:
    """What the start stage did to supervisord's programs (names)."""

    started: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


def credentials(layout: Layout) -> tuple[str, str]:
    """Keep the supervisord credentials stable across `up`s (a change would need a restart)."""
    try:
        return read_credentials(layout)
    except SupervisorError:
        return "orchestrator", secrets.token_urlsafe(24)


def child_environment(settings: Settings, overrides: Mapping[str, str]) -> dict[str, str]:
    """The environment supervisord (and so every program) runs with.

    Settings given as flags are passed on as variables so that `orchestrator serve` under
    supervisord sees exactly the settings `up` saw.
    """
    env = dict(os.environ)
    env.update(overrides)
    env["ROOT"] = str(settings.root)
    return env


def extra_programs(
    settings: Settings, layout: Layout, plan: MachinePlan, *, background_models: bool = True
) -> list[Program]:
    """The monitor, plus background downloads (only when the manifest has any) and cleanup."""
    me = [sys.executable, "-m", "orchestrator"]
    # Batch work yields the CPU to instances that are starting (`nice` execs, keeping the pid).
    batch = ["nice", "-n", "10", *me]
    plan_hash = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    programs = [
        # The plan hash makes supervisord restart the monitor when the plan changes.
        Program(
            "monitor", ("nice", "-n", "5", *me, "serve"), str(layout.root),
            {"ORCHESTRATOR_PLAN_HASH": plan_hash}, priority=50,
        ),
    ]
    if background_models:
        programs.append(
            Program(
                "models", (*batch, "models", "sync", "--tier", "background"), str(layout.root), {},
                autorestart="false", startsecs=0, priority=800,
            )
        )
    if settings.output_max_age > 0:
        programs.append(Program("cleanup", (*batch, "cleanup"), str(layout.root), {}, priority=900))
    return programs


def private_dir(path: Path) -> None:
    """The socket's folder: ours alone (mode 0700), refusing one another user planted."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise SupervisorError(f"{path} belongs to another user: remove it or use a shorter ROOT")
    path.chmod(0o700)


def render(
    settings: Settings, layout: Layout, plan: MachinePlan, *, background_models: bool, supervisord_pid: int | None
) -> None:
    """Render stage: check the ports, then write supervisord.conf (0600), the folders and plan.json.

    ``supervisord_pid``: the running supervisord, whose own processes may hold the ports.
    """
    user, password = credentials(layout)
    options = RenderOptions(username=user, password=password, stopwaitsecs=int(settings.stop_timeout))
    conf = render_supervisord_conf(
        plan, layout, options, extra_programs(settings, layout, plan, background_models=background_models)
    )
    ours = family([supervisord_pid]) if supervisord_pid is not None else set()
    check_ports(
        [(i.port, i.name) for i in plan.instances] + [(settings.orchestrator_port, "monitor")],
        ours,
    )
    create_instance_dirs(plan)
    atomic_write(layout.supervisord_conf, conf, mode=0o600)
    write_json(layout.plan_file, plan.to_dict())


def start_supervisord(layout: Layout, env: dict[str, str]) -> None:
    """Start stage on a stopped machine: supervisord as a daemon, up within 15 s or an error."""
    argv = [sys.executable, "-m", "supervisor.supervisord", "-c", str(layout.supervisord_conf)]
    # supervisord daemonizes and must outlive us: no PR_SET_PDEATHSIG here. Output through temp
    # files, so a daemon that kept the launcher's stdout could not hold us past the deadline.
    try:
        result = subproc.run(argv, cwd=None, env=env, timeout=30, merge_stderr=False, die_with_parent=False)
    except OSError as exc:
        raise SupervisorError(f"supervisord did not start: {exc}") from None
    sup = Supervisor(layout)
    if result.timed_out or result.returncode != 0 or not wait_for(sup.is_running, 15):
        text = (result.stderr + result.stdout).decode(errors="replace")
        detail = [ln for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in detail if ln.startswith("Error")]
        hint = (errors or detail or [f"see {layout.supervisord_log}"])[0]
        raise SupervisorError(f"supervisord did not start: {hint}")
    log.info("supervisord started (pid %d)", sup.pid())


def exec_supervisord(layout: Layout, env: dict[str, str], execve: Execve) -> None:
    """Start stage in a container: replace this process with supervisord in the foreground."""
    argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(layout.supervisord_conf)]
    log.info("exec supervisord in the foreground")
    execve(sys.executable, argv, env)


def reconcile(sup: Supervisor) -> Changes:
    """Start stage on a running machine: apply the new supervisord.conf, touching only the
    programs that were added, changed or removed."""
    added, changed, removed = sup.reload_config()
    for name in removed:
        sup.stop(name)
        sup.remove_group(name)
    for name in changed:
        sup.stop(name)
        sup.remove_group(name)
        sup.add_group(name)
    for name in added:
        sup.add_group(name)
    known = {p.name for p in sup.processes()}
    changes = Changes(
        started=tuple(added), restarted=tuple(changed), removed=tuple(removed),
        unchanged=tuple(sorted(known - set(added) - set(changed))),
    )
    log.info(
        "reconciled: %d started, %d restarted, %d removed, %d unchanged",
        len(changes.started), len(changes.restarted), len(changes.removed), len(changes.unchanged),
    )
    return changes
