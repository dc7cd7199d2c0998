"""Lifecycle commands: up, down, status, start/stop/restart, logs, gpus, plan."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

from orchestrator.cli.output import print_json
from orchestrator.core.errors import OrchestratorError, PlanError, SupervisorError
from orchestrator.core.layout import Layout
from orchestrator.core.plan import MachinePlan, build_plan, supported_flags
from orchestrator.core.render import Program, RenderOptions, render_supervisord_conf
from orchestrator.core.settings import Settings
from orchestrator.core.states import ProcessInfo, ProcessState
from orchestrator.machine import gpu as gpu_mod
from orchestrator.machine import lock as oplock
from orchestrator.machine import runner as subproc
from orchestrator.machine.fs import atomic_write, read_json, write_json
from orchestrator.machine.ports import check_ports, family, port_free
from orchestrator.machine.state import applied_plan, create_instance_dirs
from orchestrator.machine.supervisor import Supervisor, read_credentials, wait_for

log = logging.getLogger(__name__)


def make_plan(settings: Settings) -> MachinePlan:
    gpus = gpu_mod.detect(settings)
    return build_plan(settings, gpus, supported_flags(Layout(settings.root).comfy_dir))


# ---------------------------------------------------------------- gpus / plan
def cmd_gpus(settings: Settings, args: argparse.Namespace) -> int:
    gpus = gpu_mod.detect(settings)
    if args.json:
        print_json([g.to_dict() for g in gpus])
        return 0
    for g in gpus:
        print(
            f"{g.index}  {g.uuid}  {g.pci_bus_id}  {g.name}  "
            f"{g.memory_total // 2**20} MiB  driver {g.driver_version}"
        )
    return 0


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    plan = make_plan(settings)
    if args.json:
        print_json(plan.to_dict())
        return 0
    for inst in plan.instances:
        print(f"{inst.name}  gpu {inst.index} ({inst.gpu.uuid})  port {inst.port}")
        print(f"    {' '.join(inst.argv)}")
    return 0


# ---------------------------------------------------------------- up
class StageTimer:
    """Records how long each bootstrap stage took (for status.json and the metric)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.stages[name] = round(time.monotonic() - start, 4)
            log.info("stage %s done in %.2fs", name, self.stages[name])


def _credentials(layout: Layout) -> tuple[str, str]:
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


@dataclasses.dataclass
class UpReport:
    stages: dict[str, float]
    started: list[str]
    restarted: list[str]
    removed: list[str]
    unchanged: list[str]
    status: dict[str, Any]


def provision(settings: Settings, layout: Layout, timer: StageTimer, *, skip: bool) -> dict[str, Any]:
    """Code tree, shared config, custom nodes, models. Returns what status.json records."""
    from orchestrator.provision import repos

    status: dict[str, Any] = {}
    if not skip:
        with timer.stage("sync"):
            comfy = repos.sync_comfy(settings, layout)
            status["comfy"] = comfy.to_dict()
            if comfy.fallback:
                log.error(
                    "ComfyUI: running the FALLBACK %s %s at %s, not the configured %s",
                    comfy.url, comfy.ref, comfy.commit, comfy.wanted,
                )
            status["shared"] = repos.sync_shared(settings, layout).to_dict()
    elif not settings.shared_repo_url and not repos.has_shared_config(layout.shared_dir):
        status["shared"] = repos.sync_shared(settings, layout).to_dict()
    if not (layout.comfy_dir / "main.py").exists():
        raise PlanError(
            f"no ComfyUI code tree at {layout.comfy_dir} (main.py missing): "
            "run `orchestrator up` without --skip-provision, or check COMFY_REPO_URL"
        )
    if not skip:
        from orchestrator.provision import nodes

        with timer.stage("nodes"):
            report = nodes.sync_nodes(settings, layout)
            status["nodes"] = {"counts": dict(report.counts), "failed": list(report.failed)}
            if report.failed:
                log.error("custom nodes failed: %s (instances start without them)", ", ".join(report.failed))
    with timer.stage("models"):
        if (layout.shared_dir / "comfy_dir_config.yaml").exists():
            from orchestrator.provision.models import tree as modeltree

            status["model_tree"] = modeltree.prepare(settings, layout).to_dict()
        if not skip:
            from orchestrator.provision.models import sync as models
            from orchestrator.provision.models.manifest import load_entries

            mreport = models.sync_models(settings, layout, tier="before_start")
            status["models"] = {
                "failed": list(mreport.failed),
                "background": sum(1 for e in load_entries(settings, layout) if e.when == "background"),
            }
            if mreport.failed:
                log.error("models failed before start: %s", ", ".join(mreport.failed))
    return status


def up(
    settings: Settings,
    *,
    overrides: Mapping[str, str] | None = None,
    foreground: bool = False,
    skip_provision: bool = False,
    execve: Callable[[str, list[str], dict[str, str]], None] = os.execve,
) -> UpReport:
    """Prepare the machine, then start or reconcile supervisord."""
    layout = Layout(settings.root)
    timer = StageTimer()
    for d in (layout.state_dir, layout.logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    layout.state_dir.chmod(0o700)
    _private_dir(layout.socket.parent)
    # One up/nodes sync per ROOT; released when provisioning and the reconcile are done (and
    # before an exec of a foreground supervisord, which must not hold it for its whole life).
    with oplock.hold(layout) as lock:
        return _up_locked(
            settings, layout, timer, lock,
            overrides=overrides, foreground=foreground, skip_provision=skip_provision, execve=execve,
        )


def _up_locked(
    settings: Settings,
    layout: Layout,
    timer: StageTimer,
    lock: oplock.RootLock,
    *,
    overrides: Mapping[str, str] | None,
    foreground: bool,
    skip_provision: bool,
    execve: Callable[[str, list[str], dict[str, str]], None],
) -> UpReport:
    with timer.stage("detect"):
        gpus = gpu_mod.detect(settings)
    status = provision(settings, layout, timer, skip=skip_provision)
    with timer.stage("plan"):
        plan = build_plan(settings, gpus, supported_flags(layout.comfy_dir))
    sup = Supervisor(layout)
    running = sup.is_running()
    with timer.stage("render"):
        user, password = _credentials(layout)
        options = RenderOptions(username=user, password=password, stopwaitsecs=int(settings.stop_timeout))
        background = bool(status.get("models", {}).get("background"))
        conf = render_supervisord_conf(
            plan, layout, options, extra_programs(settings, layout, plan, background_models=background)
        )
        ours = family([sup.pid()]) if running else set()
        check_ports(
            [(i.port, i.name) for i in plan.instances]
            + [(settings.orchestrator_port, "monitor")],
            ours,
        )
        create_instance_dirs(plan)
        atomic_write(layout.supervisord_conf, conf, mode=0o600)
        write_json(layout.plan_file, plan.to_dict())
    env = child_environment(settings, overrides or {})
    report = UpReport(timer.stages, [], [], [], [], status)
    with timer.stage("start"):
        if running:
            _reconcile(sup, report)
        elif foreground:
            _write_status(layout, timer, status)
            argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(layout.supervisord_conf)]
            log.info("exec supervisord in the foreground")
            lock.release()
            execve(sys.executable, argv, env)
            return report  # only reached with a fake execve in tests
        else:
            _start_supervisord(layout, env)
            report.started = [i.name for i in plan.instances]
    _write_status(layout, timer, status)
    return report


def _private_dir(path: Path) -> None:
    """The socket's folder: ours alone (mode 0700), refusing one another user planted."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise SupervisorError(f"{path} belongs to another user: remove it or use a shorter ROOT")
    path.chmod(0o700)


def _write_status(layout: Layout, timer: StageTimer, status: dict[str, Any]) -> None:
    write_json(layout.status_file, {**status, "stages": dict(timer.stages), "updated": time.time()})


def _start_supervisord(layout: Layout, env: dict[str, str]) -> None:
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


def _reconcile(sup: Supervisor, report: UpReport) -> None:
    """Apply the new supervisord.conf: only added, changed or removed programs are touched."""
    added, changed, removed = sup.reload_config()
    for name in removed:
        sup.stop(name)
        sup.remove_group(name)
        report.removed.append(name)
    for name in changed:
        sup.stop(name)
        sup.remove_group(name)
        sup.add_group(name)
        report.restarted.append(name)
    for name in added:
        sup.add_group(name)
        report.started.append(name)
    known = {p.name for p in sup.processes()}
    report.unchanged = sorted(known - set(added) - set(changed))
    log.info(
        "reconciled: %d started, %d restarted, %d removed, %d unchanged",
        len(report.started), len(report.restarted), len(report.removed), len(report.unchanged),
    )


def _flag_overrides(args: argparse.Namespace) -> dict[str, str]:
    from orchestrator.cli.main import _flags

    overrides = _flags(args)
    if getattr(args, "config", None):
        overrides["ORCHESTRATOR_CONFIG"] = str(args.config)
    return overrides


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    report = up(
        settings,
        overrides=_flag_overrides(args),
        foreground=args.foreground,
        skip_provision=args.skip_provision,
    )
    total = sum(report.stages.values())
    if report.started or report.restarted or report.removed:
        print(
            f"up in {total:.2f}s: started {', '.join(report.started) or '-'}; "
            f"restarted {', '.join(report.restarted) or '-'}; removed {', '.join(report.removed) or '-'}"
        )
    else:
        print(f"up in {total:.2f}s: nothing changed, {len(report.unchanged)} programs keep running")
    if report.status.get("comfy", {}).get("fallback"):
        print("WARNING: running the FALLBACK ComfyUI repository (COMFY_REPO_URL could not be cloned)")
    failed = report.status.get("nodes", {}).get("failed")
    if failed:
        print(f"WARNING: custom nodes failed: {', '.join(failed)}")
    print(f"monitor: http://{settings.orchestrator_listen}:{settings.orchestrator_port}/readyz")
    return 0


# ---------------------------------------------------------------- down
def down(settings: Settings) -> list[str]:
    """Stop every program gracefully, then supervisord. Returns problems left (empty = clean)."""
    layout = Layout(settings.root)
    sup = Supervisor(layout, timeout=settings.stop_timeout * 4 + 30)
    plan = applied_plan(layout)
    problems: list[str] = []
    if sup.is_running():
        pid = sup.pid()
        # Captured as psutil.Process objects (pid + create time) BEFORE the long wait: a pid that
        # exited and was reused meanwhile is someone else's process and must not be killed.
        supervisord, tree = _process_tree(pid)
        sup.stop_all()
        with contextlib.suppress(SupervisorError):
            sup.shutdown()
        if not wait_for(lambda: not _alive(supervisord), settings.stop_timeout + 15):
            problems.append(f"supervisord (pid {pid}) did not exit")
        survivors = kill_leftovers(tree)
        if survivors:
            log.warning("killed %d leftover process(es): %s", len(survivors), survivors)
    with contextlib.suppress(FileNotFoundError):
        layout.socket.unlink()
    if plan is not None:
        ports = [i.port for i in plan.instances]
        if not wait_for(lambda: all(port_free(p) for p in ports), 10, 0.1):
            problems += [f"port {p} still in use" for p in ports if not port_free(p)]
    return problems


def _process_tree(pid: int) -> tuple[psutil.Process | None, list[psutil.Process]]:
    """The process ``pid`` and its descendants, identified by pid and create time."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return None, []
    try:
        return root, root.children(recursive=True)
    except psutil.Error:
        return root, []


def _alive(proc: psutil.Process | None) -> bool:
    """Still the same process (``is_running`` checks the create time) and not a zombie."""
    if proc is None:
        return False
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_leftovers(procs: list[psutil.Process]) -> list[int]:
    """SIGKILL those of ``procs`` still running as the same process; returns their pids.

    ``Process.kill`` itself refuses a pid that was reused by another process.
    """
    killed: list[int] = []
    for proc in procs:
        if not _alive(proc):
            continue
        try:
            proc.kill()
        except psutil.Error:
            continue
        killed.append(proc.pid)
    return killed


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    layout = Layout(settings.root)
    was_running = Supervisor(layout).is_running()
    problems = down(settings)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    print("down: every instance, the monitor and supervisord stopped" if was_running else "down: nothing was running")
    return 0


# ---------------------------------------------------------------- status
def _monitor_instances(settings: Settings) -> dict[int, dict[str, Any]]:
    import httpx

    host = "127.0.0.1" if settings.orchestrator_listen in {"0.0.0.0", "::"} else settings.orchestrator_listen
    try:
        resp = httpx.get(f"http://{host}:{settings.orchestrator_port}/instances", timeout=1.0)
        data = resp.json()
    except (httpx.HTTPError, ValueError):
        return {}
    items = data.get("instances", data) if isinstance(data, dict) else data
    out: dict[int, dict[str, Any]] = {}
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and "gpu" in item:
                out[int(item["gpu"])] = item
    return out


def status(settings: Settings) -> dict[str, Any]:
    from orchestrator.provision.repos import code_report

    layout = Layout(settings.root)
    plan = applied_plan(layout)
    if plan is None:
        raise OrchestratorError("nothing has been started here: run `orchestrator up`")
    sup = Supervisor(layout)
    running = sup.is_running()
    procs: dict[str, ProcessInfo] = {p.name: p for p in sup.processes()} if running else {}
    health = _monitor_instances(settings) if running else {}
    prov = read_json(layout.status_file, {}) or {}
    instances = []
    for inst in plan.instances:
        info = procs.get(inst.name)
        mon = health.get(inst.index, {})
        state = info.state.name if info else "STOPPED"
        last_error = ""
        if info and info.state in {ProcessState.FATAL, ProcessState.BACKOFF, ProcessState.EXITED}:
            last_error = info.spawnerr or info.description
        instances.append(
            {
                "gpu": inst.index,
                "uuid": inst.gpu.uuid,
                "name": inst.name,
                "port": inst.port,
                "pid": info.pid if info else 0,
                "state": state,
                "uptime_seconds": round(info.uptime, 1) if info else 0.0,
                "restarts": mon.get("restarts"),
                "health": mon.get("state"),
                "reason": mon.get("reason") or "",
                "failed_custom_nodes": mon.get("failed_custom_nodes") or [],
                "comfyui_version": mon.get("comfyui_version"),
                "last_error": last_error or mon.get("reason") or "",
            }
        )
    others = {n: {"state": p.state.name, "pid": p.pid} for n, p in procs.items() if not n.startswith("comfyui_gpu")}
    return {
        "supervisord": {"running": running, "pid": sup.pid() if running else 0},
        "monitor_answering": bool(health),
        "comfy": code_report(layout.comfy_dir, prov.get("comfy", {})),
        "nodes": prov.get("nodes", {}),
        "stages": prov.get("stages", {}),
        "instances": instances,
        "programs": others,
    }


def _fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    data = status(settings)
    if args.json:
        print_json(data)
        return 0
    if not data["supervisord"]["running"]:
        print("supervisord is not running: run `orchestrator up`")
    comfy = data["comfy"]
    code = f"{comfy.get('url') or '?'} {comfy.get('ref') or '?'} @ {(comfy.get('commit') or '?')[:12]}"
    if comfy.get("fallback"):
        print(f"WARNING: FALLBACK ComfyUI in use: {code} (configured: {comfy.get('wanted') or '?'})")
    else:
        print(f"ComfyUI code: {code}")
    header = (
        f"{'GPU':<4}{'PORT':<7}{'PID':<9}{'STATE':<10}{'HEALTH':<12}{'UPTIME':<10}{'RESTARTS':<9}"
        f"{'VERSION':<10}DETAIL"
    )
    print(header)
    for i in data["instances"]:
        # A READY instance whose custom nodes failed at import still says which ones.
        failed_nodes = "failed nodes: " + ", ".join(i["failed_custom_nodes"]) if i["failed_custom_nodes"] else ""
        detail = "; ".join(part for part in (i["last_error"], failed_nodes) if part)
        restarts = "-" if i["restarts"] is None else str(i["restarts"])
        print(
            f"{i['gpu']:<4}{i['port']:<7}{i['pid'] or '-':<9}{i['state']:<10}{i['health'] or '-':<12}"
            f"{_fmt_uptime(i['uptime_seconds']):<10}{restarts:<9}{i.get('comfyui_version') or '-':<10}{detail}"
        )
    failed = data["nodes"].get("failed")
    if failed:
        print(f"failed custom nodes: {', '.join(failed)}")
    return 0


# ---------------------------------------------------------------- start / stop / restart
def _targets(layout: Layout, target: str) -> list[str]:
    plan = applied_plan(layout)
    if plan is None:
        raise SupervisorError("nothing has been started here: run `orchestrator up`")
    if target == "all":
        return [i.name for i in plan.instances]
    try:
        index = int(target)
    except ValueError:
        raise PlanError(f"invalid GPU {target!r}: expected a GPU index or `all`") from None
    return [plan.instance(index).name]


def cmd_control(settings: Settings, args: argparse.Namespace) -> int:
    layout = Layout(settings.root)
    names = _targets(layout, args.target)
    sup = Supervisor(layout, timeout=settings.stop_timeout * 2 + 30)
    if not sup.is_running():
        raise SupervisorError("supervisord is not running: run `orchestrator up`")
    for name in names:
        if args.command == "start":
            sup.start(name)
        elif args.command == "stop":
            sup.stop(name)
        else:
            sup.restart(name)
        print(f"{name}: {args.command} done")
    return 0


# ---------------------------------------------------------------- logs
def tail_lines(path: Path, n: int) -> list[str]:
    try:
        with path.open("rb") as fh:
            return [line.decode(errors="replace").rstrip("\n") for line in collections.deque(fh, maxlen=n)]
    except FileNotFoundError:
        return []


def follow(paths: Mapping[str, Path], emit: Callable[[str, str], None], stop: Callable[[], bool]) -> None:
    """Print new lines of every file as they arrive; survives rotation and truncation."""
    offsets = {k: (p.stat().st_size if p.exists() else 0) for k, p in paths.items()}
    partial = dict.fromkeys(paths, "")
    while not stop():
        for key, path in paths.items():
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < offsets[key]:
                offsets[key] = 0  # rotated or truncated
            if size == offsets[key]:
                continue
            with path.open("rb") as fh:
                fh.seek(offsets[key])
                chunk = fh.read(size - offsets[key])
            offsets[key] = size
            text = partial[key] + chunk.decode(errors="replace")
            *lines, partial[key] = text.split("\n")
            for line in lines:
                emit(key, line)
        time.sleep(0.2)


def cmd_logs(settings: Settings, args: argparse.Namespace) -> int:
    layout = Layout(settings.root)
    plan = applied_plan(layout)
    if plan is None:
        raise OrchestratorError("nothing has been started here: run `orchestrator up`")
    if args.target == "all":
        chosen = list(plan.instances)
    else:
        try:
            chosen = [plan.instance(int(args.target))]
        except ValueError:
            raise PlanError(f"invalid GPU {args.target!r}: expected a GPU index or `all`") from None
    prefix = len(chosen) > 1
    paths = {f"gpu{i.index}": i.log_file for i in chosen}

    def emit(key: str, line: str) -> None:
        print(f"[{key}] {line}" if prefix else line, flush=True)

    for key, path in paths.items():
        for line in tail_lines(path, args.lines):
            emit(key, line)
    if args.follow:
        with contextlib.suppress(KeyboardInterrupt):
            follow(paths, emit, lambda: False)
    return 0
