"""Lifecycle commands: up, down, status, start/stop/restart, logs, gpus, plan, demo.

Each handler calls a ``lifecycle`` service and renders the value it returns (``--json`` and
the text both come from that value).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from types import FrameType

from orchestrator.cli.config import flag_overrides
from orchestrator.cli.output import error, print_json, print_json_line, print_line
from orchestrator.core.settings import Settings, load_settings
from orchestrator.lifecycle import control, demo, down, logs, plan, status, up
from orchestrator.lifecycle.logs import LogLine
from orchestrator.lifecycle.status import InstanceRow, MachineStatus


# ---------------------------------------------------------------- gpus / plan
def cmd_gpus(settings: Settings, args: argparse.Namespace) -> int:
    gpus = plan.detect_gpus(settings)
    if args.json:
        print_json([g.to_dict() for g in gpus])
        return 0
    for g in gpus:
        print_line(
            f"{g.index}  {g.uuid}  {g.pci_bus_id}  {g.name}  "
            f"{g.memory_total // 2**20} MiB  driver {g.driver_version}"
        )
    return 0


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    machine_plan = plan.make_plan(settings)
    if args.json:
        print_json(machine_plan.to_dict())
        return 0
    for inst in machine_plan.instances:
        print_line(f"{inst.name}  gpu {inst.index} ({inst.gpu.uuid})  port {inst.port}")
        print_line(f"    {' '.join(inst.argv)}")
    return 0


# ---------------------------------------------------------------- up / down
def _up_overrides(args: argparse.Namespace) -> dict[str, str]:
    """Settings given as flags, handed on to supervisord's programs as variables."""
    overrides = flag_overrides(args)
    if getattr(args, "config", None):
        overrides["ORCHESTRATOR_CONFIG"] = str(args.config)
    return overrides


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    report = up.up(
        settings,
        overrides=_up_overrides(args),
        foreground=args.foreground,
        skip_provision=args.skip_provision,
    )
    changes = report.changes
    total = report.total_seconds
    if changes.started or changes.restarted or changes.removed:
        print_line(
            f"up in {total:.2f}s: started {', '.join(changes.started) or '-'}; "
            f"restarted {', '.join(changes.restarted) or '-'}; removed {', '.join(changes.removed) or '-'}"
        )
    else:
        print_line(f"up in {total:.2f}s: nothing changed, {len(changes.unchanged)} programs keep running")
    if report.comfy_fallback:
        print_line("WARNING: running the FALLBACK ComfyUI repository (COMFY_REPO_URL could not be cloned)")
    if report.failed_nodes:
        print_line(f"WARNING: custom nodes failed: {', '.join(report.failed_nodes)}")
    for name, why in sorted((report.record.get("nodes", {}).get("import_failed") or {}).items()):
        print_line(f"WARNING: custom node {name} fails at import (checked before start): {why}")
    print_line(f"monitor: http://{settings.orchestrator_listen}:{settings.orchestrator_port}/readyz")
    return 0


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    teardown = down.down(settings)
    for problem in teardown.problems:
        error(problem)
    if not teardown.ok:
        return 1
    print_line(
        "down: every instance, the monitor and supervisord stopped"
        if teardown.was_running
        else "down: nothing was running"
    )
    return 0


# ---------------------------------------------------------------- status
def _fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


STATUS_HEADER = (
    f"{'GPU':<4}{'PORT':<7}{'PID':<9}{'STATE':<10}{'HEALTH':<12}{'UPTIME':<10}{'RESTARTS':<9}"
    f"{'VERSION':<10}DETAIL"
)


def status_line(row: InstanceRow) -> str:
    """One instance as a line of the status table."""
    # A READY instance whose custom nodes failed at import still says which ones.
    failed_nodes = "failed nodes: " + ", ".join(row.failed_custom_nodes) if row.failed_custom_nodes else ""
    detail = "; ".join(part for part in (row.last_error, failed_nodes) if part)
    restarts = "-" if row.restarts is None else str(row.restarts)
    return (
        f"{row.gpu:<4}{row.port:<7}{row.pid or '-':<9}{row.state:<10}{row.health or '-':<12}"
        f"{_fmt_uptime(row.uptime_seconds):<10}{restarts:<9}{row.comfyui_version or '-':<10}{detail}"
    )


def supervisord_lines(data: MachineStatus) -> list[str]:
    """What status says about supervisord, orphans of this ROOT and foreign port holders."""
    if data.supervisord_running:
        return []
    lines = []
    if data.socket_held:
        lines.append("supervisord does not answer, but a process listens on its control socket (slow or stopped?)")
    orphans = data.orphans
    if orphans:
        ports = ", ".join(f"{h.port} ({h.purpose}, pid {h.pid})" for h in orphans)
        lines.append(
            f"supervisord is not running; {len(orphans)} orphaned process"
            f"{'es hold ports' if len(orphans) > 1 else ' holds port'} {ports}; run `orchestrator up`"
        )
    elif not data.socket_held:
        lines.append("supervisord is not running: run `orchestrator up`")
    lines += [
        f"port {h.port} ({h.purpose}) is held by pid {h.pid} ({h.name}), not a process of this ROOT"
        for h in data.foreign
    ]
    return lines


def _print_status(data: MachineStatus) -> None:
    for line in (*data.warnings, *supervisord_lines(data)):
        print_line(line)
    comfy = data.comfy
    code = f"{comfy.get('url') or '?'} {comfy.get('ref') or '?'} @ {(comfy.get('commit') or '?')[:12]}"
    if comfy.get("fallback"):
        print_line(f"WARNING: FALLBACK ComfyUI in use: {code} (configured: {comfy.get('wanted') or '?'})")
    else:
        print_line(f"ComfyUI code: {code}")
    print_line(STATUS_HEADER)
    for row in data.instances:
        print_line(status_line(row))
    failed = data.nodes.get("failed")
    if failed:
        print_line(f"failed custom nodes: {', '.join(failed)}")
    for name, why in sorted((data.nodes.get("import_failed") or {}).items()):
        print_line(f"custom node {name} fails at import: {why}")


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    data = status.status(settings)
    if args.json:
        print_json(data.to_dict())
    else:
        _print_status(data)
    return 0


# ---------------------------------------------------------------- start / stop / restart
def cmd_control(settings: Settings, args: argparse.Namespace) -> int:
    for done in control.control(settings, args.command, args.target):
        print_line(f"{done.name}: {done.action} done")
    return 0


# ---------------------------------------------------------------- logs
def cmd_logs(settings: Settings, args: argparse.Namespace) -> int:
    files = logs.log_files(settings, args.target)
    prefix = len(files) > 1

    def emit(line: LogLine) -> None:
        if args.json:
            print_json_line(line.to_dict())
        else:
            print_line(f"[{line.key}] {line.line}" if prefix else line.line, flush=True)

    for line in logs.tail(files, args.lines):
        emit(line)
    if args.follow:
        with contextlib.suppress(KeyboardInterrupt):
            for line in logs.follow(files, lambda: False):
                emit(line)
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    # main() chose the root (a temporary folder when none was given) and set up logging there.
    root = settings.root
    root.mkdir(parents=True, exist_ok=True)
    print_line(f"demo root: {root}", flush=True)
    urls = demo.build_sources(root / "demo-src")
    overrides = demo.demo_settings(root, args.gpus, urls)
    settings = load_settings(os.environ, {**overrides, **flag_overrides(args)})
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        run = demo.start(settings, overrides, args.gpus)
        for url in run.instance_urls:
            print_line(f"instance: {url}", flush=True)
        mon = run.monitor_url
        print_line(f"monitor:  {mon}/readyz  {mon}/metrics  {mon}/instances", flush=True)
        print_line(
            "status:   .venv/bin/orchestrator status   (status, gpus, plan, logs find the running demo)", flush=True
        )
        print_line(f"          MOCK_GPU=1 NUM_GPUS={args.gpus} .venv/bin/orchestrator --root {root} status", flush=True)
        if demo.wait_ready(settings, 90):
            print_line(f"all {args.gpus} instances READY; Ctrl-C stops everything", flush=True)
        else:
            print_line("instances are not READY yet: see `orchestrator status`; Ctrl-C stops everything", flush=True)
        stop.wait()
    finally:
        print_line("stopping...", flush=True)
        teardown = demo.stop(settings)
        for problem in teardown.problems:
            print_line(f"error: {problem}", flush=True)
        print_line("demo stopped: no instance, monitor or supervisord left running", flush=True)
    return 0

