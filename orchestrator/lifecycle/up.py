"""``up``: prepare the machine, then start or reconcile supervisord, as a pipeline of stages.

    preflight → detect → provision (sync, nodes, models) → plan → render → start → watch

``preflight`` checks every rule the monitor enforces at its own start (``monitor.preflight``)
before anything is cloned, installed or started; ``watch`` (``lifecycle.watch``) fails ``up`` when
a program it just started is BACKOFF/FATAL in supervisord instead of RUNNING.

Each stage is a function that takes values and returns one (``provision`` here, ``render``,
``start_supervisord`` and ``reconcile`` in ``lifecycle.launch``); :class:`StageTimer` records
how long each took, for status.json, the metric and the returned :class:`UpReport`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.core.environment import check_passthrough, passthrough_environment
from orchestrator.core.errors import PlanError, SupervisorError
from orchestrator.core.generation import differences
from orchestrator.core.layout import Layout
from orchestrator.core.plan import MachinePlan, build_plan, supported_flags
from orchestrator.core.settings import Settings
from orchestrator.core.states import ProcessState
from orchestrator.lifecycle import generation as generations
from orchestrator.lifecycle import launch, rolling, watch
from orchestrator.machine import gpu as gpu_mod
from orchestrator.machine import lock as oplock
from orchestrator.machine.fs import write_json
from orchestrator.machine.generation import current_id
from orchestrator.machine.state import applied_plan
from orchestrator.machine.supervisor import Supervisor
from orchestrator.monitor.preflight import check_inputs, check_ports, check_start

if TYPE_CHECKING:
    from orchestrator.provision.models.status import ByteBar

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 15.0  # seconds for started programs to pass their startsecs (1 s) in supervisord


class StageTimer:
    """Records how long each bootstrap stage took (for status.json and the metric)."""

    def __init__(self, progress: rolling.Progress | None = None) -> None:
        self.stages: dict[str, float] = {}  # seconds, in the order the stages ran
        self.progress = progress  # told "<stage>: ..." as each stage starts and ends

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        if self.progress is not None:
            self.progress(f"{name}: ...")
        try:
            yield
        finally:
            self.stages[name] = round(time.monotonic() - start, 4)
            log.info("stage %s done in %.2fs", name, self.stages[name])
            if self.progress is not None:
                self.progress(f"{name}: done in {self.stages[name]:.2f}s")


@dataclasses.dataclass(frozen=True)
class UpReport:
    """What one ``up`` did: stage timings (seconds), program changes, and the provisioning
    record that status.json keeps (``comfy``, ``shared``, ``nodes``, ``model_tree``, ``models``)."""

    stages: Mapping[str, float]
    changes: launch.Changes
    record: Mapping[str, Any]
    generation: str = ""
    reasons: tuple[str, ...] = ()  # what changed since the last generation (core.generation.differences)
    roll: rolling.RollReport | None = None

    @property
    def total_seconds(self) -> float:
        return sum(self.stages.values())

    @property
    def comfy_fallback(self) -> bool:
        return bool(self.record.get("comfy", {}).get("fallback"))

    @property
    def failed_nodes(self) -> tuple[str, ...]:
        return tuple(self.record.get("nodes", {}).get("failed") or ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": dict(self.stages),
            **{k: list(v) for k, v in dataclasses.asdict(self.changes).items()},
            "status": dict(self.record),
            "generation": self.generation,
            "reasons": list(self.reasons),
            "roll": None if self.roll is None else self.roll.to_dict(),
        }


def provision(
    settings: Settings, layout: Layout, timer: StageTimer, *, skip: bool, models_bar: ByteBar | None = None
) -> dict[str, Any]:
    """Code tree, shared config, custom nodes, models. Returns what status.json records.

    ``models_bar``: the bytes of the before-start downloads (the CLI draws it on a terminal)."""
    from orchestrator.provision.repos import sync as repos
    from orchestrator.provision.repos.shipped import has_shared_config

    status: dict[str, Any] = {}
    locked = None
    if settings.lockfile is not None and not skip:  # up --locked: checked before any change
        from orchestrator.provision.lock import locked as lockmod

        locked = lockmod.prepare(settings, layout)
        settings = locked.settings
    if not skip:
        with timer.stage("sync"):
            if timer.progress is not None:
                timer.progress(f"sync: ComfyUI into {layout.comfy_dir} ...")
            comfy = repos.sync_comfy(settings, layout)
            if locked:
                locked.pin_comfy(layout)
            status["comfy"] = comfy.to_dict()
            if comfy.fallback:
                log.error(
                    "ComfyUI: running the FALLBACK %s %s at %s, not the configured %s",
                    comfy.url, comfy.ref, comfy.commit, comfy.wanted,
                )
            if timer.progress is not None:
                timer.progress("sync: the shared config repository ...")
            status["shared"] = repos.sync_shared(settings, layout).to_dict()
        check_inputs(settings)  # the copies just fetched, before any pip
    elif not settings.shared_repo_url and not has_shared_config(layout.shared_dir):
        status["shared"] = repos.sync_shared(settings, layout).to_dict()
    if not (layout.comfy_dir / "main.py").exists():
        raise PlanError(
            f"no ComfyUI code tree at {layout.comfy_dir} (main.py missing): "
            "run `orchestrator up` without --skip-provision, or check COMFY_REPO_URL"
        )
    if not skip:
        from orchestrator.provision.nodes import sync as nodes

        with timer.stage("nodes"):
            report = nodes.sync_nodes(
                settings, layout, config_file=locked.node_config(layout) if locked else None,
                constraints=locked.pins if locked else (), progress=timer.progress,
            )
            status["nodes"] = {"counts": dict(report.counts), "failed": list(report.failed)}
            status["nodes"]["import_failed"] = dict(report.import_failed)  # checked before any start
            if report.failed:
                log.error("custom nodes failed: %s (instances start without them)", ", ".join(report.failed))
    with timer.stage("models"):
        if (layout.shared_dir / "comfy_dir_config.yaml").exists():
            from orchestrator.provision.models import tree as modeltree

            status["model_tree"] = modeltree.prepare(settings, layout).to_dict()
        if not skip:
            from orchestrator.provision.models import sync as models
            from orchestrator.provision.models.manifest import load_entries

            mreport = models.sync_models(settings, layout, tier="before_start", bar=models_bar)
            status["models"] = {
                "failed": list(mreport.failed),
                "background": sum(1 for e in load_entries(settings, layout) if e.when == "background"),
            }
            if mreport.failed:
                log.error("models failed before start: %s", ", ".join(mreport.failed))
    if not skip:  # the lock's packages (up --locked), else a record of what this up installed
        from orchestrator.provision.lock import machine as lockmachine

        with timer.stage("lock"):
            drift = locked.install(layout) if locked else []
            digest = locked.lock.digest if locked else lockmachine.record_installed(settings, layout)
            status["lock"] = {"hash": digest, "file": str(locked.path) if locked else None,
                              "drift": [d.line for d in drift]}
    return status


def up(
    settings: Settings,
    *,
    overrides: Mapping[str, str] | None = None,
    foreground: bool = False,
    skip_provision: bool = False,
    provision_only: bool = False,
    execve: launch.Execve = os.execve,
    progress: rolling.Progress | None = None,
    models_bar: ByteBar | None = None,
) -> UpReport:
    """Prepare the machine, then start or reconcile supervisord.

    Args:
        overrides: settings given as flags, passed on to supervisord's programs as variables.
        foreground: exec supervisord in the foreground (containers); returns only with a fake ``execve``.
        skip_provision: use the code, nodes and models already on disk.
        provision_only: fetch the code, nodes and models, then stop: no GPU detection, no
            supervisord (an image build that bakes ROOT in, ``BAKE=1``).
        progress: told one line as each stage starts and ends, and each step of a roll.
        models_bar: progress of the before-start model downloads, in bytes.

    Raises:
        ConfigError: a setting the monitor would refuse at its start (checked before anything).
        PlanError: no code tree, a busy port, a plan that cannot be built.
        SupervisorError: supervisord did not start or refused the new config, or a program it
            started is crash-looping (BACKOFF/FATAL).
    """
    check_start(settings)
    check_passthrough(settings.instance_env_passthrough)  # a secret there: refused before anything
    check_inputs(settings)  # files on disk, COMFY_ARGS: before any folder, clone or pip
    layout = Layout(settings.root)
    for d in (layout.state_dir, layout.logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    layout.state_dir.chmod(0o700)
    launch.private_dir(layout.socket.parent)
    # One up/nodes sync per ROOT; released when provisioning and the reconcile are done (and
    # before an exec of a foreground supervisord, which must not hold it for its whole life).
    with oplock.hold(layout) as lock:
        return _pipeline(
            settings, layout, lock, overrides=overrides or {}, foreground=foreground,
            skip_provision=skip_provision, provision_only=provision_only, execve=execve, progress=progress,
            models_bar=models_bar,
        )


def _pipeline(
    settings: Settings,
    layout: Layout,
    lock: oplock.RootLock,
    *,
    overrides: Mapping[str, str],
    foreground: bool,
    skip_provision: bool,
    execve: launch.Execve,
    provision_only: bool = False,
    progress: rolling.Progress | None = None,
    models_bar: ByteBar | None = None,
) -> UpReport:
    timer = StageTimer(progress)
    if provision_only:
        record = provision(settings, layout, timer, skip=False, models_bar=models_bar)
        _write_status(layout, timer, record)
        return UpReport(stages=dict(timer.stages), changes=launch.Changes(), record=record)
    with timer.stage("detect"):
        gpus = gpu_mod.detect(settings)
    check_ports(settings, [g.index for g in gpus])
    record = provision(settings, layout, timer, skip=skip_provision, models_bar=models_bar)
    with timer.stage("plan"):
        plan = build_plan(settings, gpus, supported_flags(layout.comfy_dir))
    with timer.stage("generation"):
        gen = generations.compute(
            settings, layout, plan, passthrough_environment(os.environ, settings.instance_env_passthrough)
        )
        previous = generations.recorded(layout)
        reasons = tuple(differences(previous.components if previous else None, gen.components))
    sup = Supervisor(layout, timeout=settings.stop_timeout * 2 + 30)
    running = sup.is_running()
    with timer.stage("render"):
        launch.render(
            settings, layout, plan,
            background_models=bool(record.get("models", {}).get("background")),
            supervisord_pid=sup.pid() if running else None, overrides=overrides, generation=gen.id,
        )
        generations.record(layout, gen, previous)
    env = launch.child_environment()
    with timer.stage("start"):
        if running:
            instances = {i.name for i in plan.instances}
            reconciled = launch.reconcile(sup, instances, drain_wait=settings.shutdown_drain_timeout)
            changes = stale_instances(sup, plan, gen.id, reconciled)
        elif foreground:
            _write_status(layout, timer, record)
            lock.release()
            launch.exec_supervisord(layout, env, execve, umask=settings.umask)
            changes = launch.Changes()  # only reached with a fake execve in tests
        else:
            launch.start_supervisord(layout, env)
            changes = launch.Changes(started=tuple(i.name for i in plan.instances))
    if not foreground or running:
        with timer.stage("watch"):
            started = (*changes.started, *changes.restarted) if running else [p.name for p in sup.processes()]
            watch.watch_started(sup, started, timeout=WATCH_TIMEOUT, redact=settings.redact)
    roll = None
    if changes.rolling:
        with timer.stage("roll"):
            targets = [i for i in plan.instances if i.name in changes.rolling]
            if progress is not None:
                why = "; ".join(reasons) or "their supervisord programs changed"
                progress(settings.redact(f"rolling {', '.join(changes.rolling)} to generation {gen.id}: {why}"))
            roll = rolling.roll(settings, sup, targets, gen.id, progress=progress or (lambda _line: None))
    if not (foreground and not running):
        _write_status(layout, timer, record)
    return UpReport(
        stages=dict(timer.stages), changes=changes, record=record, generation=gen.id, reasons=reasons, roll=roll
    )


def stale_instances(sup: Supervisor, plan: MachinePlan, generation: str, changes: launch.Changes) -> launch.Changes:
    """Add to ``changes.rolling`` the running instances whose process started with another generation
    (their supervisord program may be unchanged, e.g. after a roll that stopped)."""
    touched = {*changes.rolling, *changes.started, *changes.restarted}
    table = {p.name: p for p in sup.processes()}
    stale = []
    for inst in plan.instances:
        proc = table.get(inst.name)
        if inst.name in touched or proc is None or proc.state is not ProcessState.RUNNING:
            continue
        if generations.process_generation(proc.pid) != generation:
            stale.append(inst.name)
    if not stale:
        return changes
    rolling_names = tuple(sorted({*changes.rolling, *stale}))
    unchanged = tuple(n for n in changes.unchanged if n not in stale)
    return dataclasses.replace(changes, rolling=rolling_names, unchanged=unchanged)


def wait_serving(settings: Settings, timeout: float, progress: rolling.Progress | None = None) -> list[rolling.Serving]:
    """``up --wait``: every applied instance READY on the current generation, or why not.

    Raises:
        SupervisorError: nothing was started here.
    """
    layout = Layout(settings.root)
    plan = applied_plan(layout)
    if plan is None:
        raise SupervisorError("nothing has been started here: run `orchestrator up`")
    sup = Supervisor(layout)
    return rolling.wait_serving(
        settings, sup, plan.instances, current_id(layout) or "", timeout, progress=progress or (lambda _line: None)
    )


def _write_status(layout: Layout, timer: StageTimer, record: Mapping[str, Any]) -> None:
    write_json(layout.status_file, {**record, "stages": dict(timer.stages), "updated": time.time()})
