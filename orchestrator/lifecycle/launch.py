"""The last stages of ``up``: render supervisord.conf, then start supervisord or reconcile it.

Each stage is a function that takes values and returns one; ``lifecycle.up`` runs them in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from orchestrator.core.environment import base_environment, passthrough_environment, program_environment
from orchestrator.core.errors import SupervisorError
from orchestrator.core.generation import ENV_VAR as GENERATION_VAR
from orchestrator.core.layout import Layout
from orchestrator.core.plan import MachinePlan
from orchestrator.core.render import Program, RenderOptions, render_supervisord_conf
from orchestrator.core.settings import Settings
from orchestrator.machine import envexec, pdeath, watchdog
from orchestrator.machine import runner as subproc
from orchestrator.machine.clock import wait_for
from orchestrator.machine.fs import atomic_write, write_json
from orchestrator.machine.orphans import port_holders, stop_orphans
from orchestrator.machine.ports import check_ports, family
from orchestrator.machine.state import create_instance_dirs
from orchestrator.machine.supervisor import Supervisor, read_credentials, write_credentials

log = logging.getLogger(__name__)

Execve = Callable[[str, list[str], dict[str, str]], None]


@dataclasses.dataclass(frozen=True)
class Changes:
    """What the start stage did to supervisord's programs (names)."""

    started: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    # Instances whose program changed: left running, to be restarted one at a time (lifecycle.rolling).
    rolling: tuple[str, ...] = ()


def credentials(layout: Layout) -> tuple[str, str]:
    """Keep the supervisord credentials stable across `up`s (a change would need a restart)."""
    try:
        return read_credentials(layout)
    except SupervisorError:
        return "orchestrator", secrets.token_urlsafe(24)


def pdeath_wrapper() -> tuple[str, ...]:
    """The exec wrapper that makes instances and batch programs die with supervisord
    (see :mod:`orchestrator.machine.pdeath`).

    Run as a script in isolated mode without ``site`` (``-I -S``): it needs only the standard
    library, starts in half the time of ``-m``, and does not depend on the instance's sys.path.
    """
    return (sys.executable, "-I", "-S", pdeath.__file__, "--")


def child_environment() -> dict[str, str]:
    """The environment supervisord itself runs with: the allow-list only, no secret, no setting.

    supervisord passes its own environment to every program it starts, and a program's
    ``environment=`` can add variables but not remove them; so the scrub happens here, and each
    program's extra variables are given to it alone: INSTANCE_ENV_PASSTHROUGH in an instance's
    ``environment=`` line, the settings and its own secrets for the orchestrator's programs
    through their 0600 env files (:func:`envexec_wrapper`). See :mod:`orchestrator.core.environment`.
    """
    return base_environment(os.environ)


PROGRAMS_WITH_ENV = ("monitor", "models", "cleanup", "queue")
INSTANCE_ONLY = frozenset({"COMFY_ARGS", "COMFY_FLAGS"})  # settings no orchestrator program reads


def env_file(layout: Layout, program: str) -> Path:
    """The 0600 file of variables one orchestrator program is started with."""
    return layout.state_dir / "env" / f"{program}.json"


def envexec_wrapper(path: Path) -> tuple[str, ...]:
    """The exec wrapper that adds ``path``'s variables (see :mod:`orchestrator.machine.envexec`)."""
    return (sys.executable, "-I", "-S", envexec.__file__, str(path), "--")


def program_envs(settings: Settings, overrides: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Per orchestrator program: the setting variables `up` saw (environment and ``overrides``,
    the flags), so that it runs with the settings `up` ran with, and of the secrets only its own."""
    return {name: program_environment(settings, os.environ, overrides or {}, name) for name in PROGRAMS_WITH_ENV}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def extra_programs(
    settings: Settings,
    layout: Layout,
    plan: MachinePlan,
    *,
    background_models: bool = True,
    envs: Mapping[str, Mapping[str, str]] | None = None,
) -> list[Program]:
    """The monitor, plus background downloads (only when the manifest has any) and cleanup.

    Each starts through :func:`envexec_wrapper` with its file of ``envs`` (:func:`program_envs`);
    the hash of its variables in ``environment=`` makes `up` restart it when they change.
    """
    envs = envs if envs is not None else program_envs(settings)

    def me(program: str) -> list[str]:
        return [*envexec_wrapper(env_file(layout, program)), sys.executable, "-m", "orchestrator"]

    def env(program: str) -> dict[str, str]:
        # Settings only the instances use do not restart the orchestrator's programs (a flag
        # change rolls the instances; a monitor restart would drop the jobs it tracks).
        kept = {k: v for k, v in envs[program].items() if k not in INSTANCE_ONLY}
        return {"ORCHESTRATOR_ENV_HASH": _digest(kept)}

    # Batch work yields the CPU to instances that are starting (`nice` execs, keeping the pid).
    def batch(program: str) -> list[str]:
        return ["nice", "-n", "10", *me(program)]

    plan_hash = _digest(monitor_view(plan))
    programs = [
        # The plan hash makes supervisord restart the monitor when the plan changes (the parts it
        # uses: an instance's flags or environment changing rolls the instance, not the monitor).
        Program(
            "monitor", ("nice", "-n", "5", *me("monitor"), "serve"), str(layout.root),
            {**env("monitor"), "ORCHESTRATOR_PLAN_HASH": plan_hash},
            # Above the instances' 100: supervisord's shutdown (a container's SIGTERM) stops the
            # monitor first, and it drains (SHUTDOWN_DRAIN_TIMEOUT) while the instances still run.
            priority=150, stopwaitsecs=math.ceil(settings.shutdown_drain_timeout) + 15,
            # Outlives a killed supervisord to answer /readyz 503; `up` stops it (lifecycle.orphans).
            die_with_supervisord=False,
        ),
    ]
    if background_models:
        programs.append(
            Program(
                "models", (*batch("models"), "models", "sync", "--tier", "background"), str(layout.root), env("models"),
                autorestart="false", startsecs=0, priority=800,
            )
        )
    if settings.output_max_age > 0:
        programs.append(
            Program("cleanup", (*batch("cleanup"), "cleanup"), str(layout.root), env("cleanup"), priority=900)
        )
    if settings.job_queue_url:  # the Redis queue worker; the URL (a secret) comes from its env file
        programs.append(
            Program("queue", (*me("queue"), "worker"), str(layout.root), env("queue"), priority=60, stopwaitsecs=30)
        )
    programs.append(watchdog_program(settings, layout))
    return programs


def monitor_view(plan: MachinePlan) -> dict[str, object]:
    """The plan without each instance's argv and environment (the monitor uses neither)."""
    data = plan.to_dict()
    data["instances"] = [{k: v for k, v in i.items() if k not in ("argv", "env")} for i in data["instances"]]
    return data


def watchdog_program(settings: Settings, layout: Layout) -> Program:
    """The supervisord event listener that restarts a stuck monitor (see :mod:`orchestrator.machine.watchdog`).

    Its two values come as arguments: it needs no setting variable and no secret.
    """
    bound = watchdog.stale_after(settings.probe_interval, settings.probe_timeout)
    argv = (
        sys.executable, "-m", "orchestrator.machine.watchdog",
        "--root", str(layout.root), "--stale-after", f"{bound:g}",
    )
    return Program("watchdog", argv, str(layout.root), {}, events="TICK_5", priority=60)


def private_dir(path: Path) -> None:
    """The socket's folder: ours alone (mode 0700), refusing one another user planted."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise SupervisorError(f"{path} belongs to another user: remove it or use a shorter ROOT")
    path.chmod(0o700)


def render(
    settings: Settings,
    layout: Layout,
    plan: MachinePlan,
    *,
    background_models: bool,
    supervisord_pid: int | None,
    overrides: Mapping[str, str] | None = None,
    generation: str | None = None,
) -> None:
    """Render stage: check the ports, then write supervisord.conf (0600), the folders and plan.json.

    ``supervisord_pid``: the running supervisord, whose own processes may hold the ports.
    ``overrides``: settings given as flags, passed on to the orchestrator's own programs.
    ``generation``: the id each instance gets as ORCHESTRATOR_GENERATION (see ``core.generation``).

    Raises:
        ConfigError: INSTANCE_ENV_PASSTHROUGH names a secret.
    """
    user, password = credentials(layout)
    instance_env = passthrough_environment(os.environ, settings.instance_env_passthrough)
    if generation:
        instance_env[GENERATION_VAR] = generation
    options = RenderOptions(
        username=user, password=password, stopwaitsecs=int(settings.stop_timeout), wrapper=pdeath_wrapper(),
        umask=settings.umask, instance_env=instance_env,
    )
    envs = program_envs(settings, overrides)
    programs = extra_programs(settings, layout, plan, background_models=background_models, envs=envs)
    conf = render_supervisord_conf(plan, layout, options, programs)
    ours = family([supervisord_pid]) if supervisord_pid is not None else set()
    clear_orphans(settings, layout, plan, ours)
    check_ports(
        [(i.port, i.name) for i in plan.instances] + [(settings.orchestrator_port, "monitor")],
        ours,
    )
    create_instance_dirs(plan, settings.umask)
    write_credentials(layout, user, password)
    write_env_files(layout, {p.name: envs[p.name] for p in programs if p.name in envs})
    atomic_write(layout.supervisord_conf, conf, mode=0o600)
    write_json(layout.plan_file, plan.to_dict())


def write_env_files(layout: Layout, envs: Mapping[str, Mapping[str, str]]) -> None:
    """Each program's variables, mode 0600 in a 0700 folder; a removed program's file goes."""
    folder = env_file(layout, "monitor").parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    for name in PROGRAMS_WITH_ENV:
        path = env_file(layout, name)
        if name in envs:
            write_json(path, dict(envs[name]), mode=0o600)
        else:
            path.unlink(missing_ok=True)


def clear_orphans(settings: Settings, layout: Layout, plan: MachinePlan, ours: set[int]) -> list[int]:
    """Stop this ROOT's processes of an earlier generation that hold the plan's ports (they
    outlived a killed supervisord); foreign holders are left for ``check_ports`` to report."""
    ports = {i.port: i.name for i in plan.instances}
    ports[settings.orchestrator_port] = "monitor"
    stale = [h for h in port_holders(layout.root, ports, ours) if h.ours]
    if not stale:
        return []
    log.warning(
        "stopping %d process(es) of an earlier generation on this ROOT: %s",
        len(stale), ", ".join(f"pid {h.pid} on port {h.port} ({h.purpose})" for h in stale),
    )
    return stop_orphans(layout.root, stale, grace=settings.stop_timeout)


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


def exec_supervisord(layout: Layout, env: dict[str, str], execve: Execve, umask: int = 0o077) -> None:
    """Start stage in a container: replace this process with supervisord in the foreground.

    supervisord applies its ``umask=`` only when it daemonises; in the foreground it keeps ours,
    so it is set here (for the logs it writes), and put back if ``execve`` returns (tests).
    """
    argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(layout.supervisord_conf)]
    log.info("exec supervisord in the foreground")
    old = os.umask(umask)
    try:
        execve(sys.executable, argv, env)
    finally:
        os.umask(old)


def reconcile(sup: Supervisor, instances: Collection[str] = (), drain_wait: float = 0.0) -> Changes:
    """Start stage on a running machine: apply the new supervisord.conf, touching only the
    programs that were added, changed or removed.

    A changed program named in ``instances`` keeps running on its old config: it is returned in
    ``rolling``, for :mod:`lifecycle.rolling` to restart one at a time with a drain.
    ``drain_wait``: seconds a stopping monitor may take to drain its running jobs
    (SHUTDOWN_DRAIN_TIMEOUT).
    """
    added, changed, removed = sup.reload_config()
    rolling = [n for n in changed if n in instances]
    changed = [n for n in changed if n not in instances]
    # Stopping the monitor waits out its drain: that one call gets a client timeout to match.
    monitor_sup = Supervisor(sup.layout, timeout=drain_wait + 30) if drain_wait else sup
    for name in removed:
        (monitor_sup if name == "monitor" else sup).stop(name)
        sup.remove_group(name)
    for name in changed:
        (monitor_sup if name == "monitor" else sup).stop(name)
        sup.remove_group(name)
        sup.add_group(name)
    for name in added:
        sup.add_group(name)
    known = {p.name for p in sup.processes()}
    changes = Changes(
        started=tuple(added), restarted=tuple(changed), removed=tuple(removed),
        unchanged=tuple(sorted(known - set(added) - set(changed) - set(rolling))), rolling=tuple(rolling),
    )
    log.info(
        "reconciled: %d started, %d restarted, %d removed, %d unchanged, %d to roll",
        len(changes.started), len(changes.restarted), len(changes.removed), len(changes.unchanged),
        len(changes.rolling),
    )
    return changes
