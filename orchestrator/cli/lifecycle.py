"""Lifecycle commands: up, down, status, start/stop/restart, logs, gpus, plan, demo.

Each handler calls a ``lifecycle`` service and renders the value it returns (``--json`` and
the text both come from that value).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import TextIO

from orchestrator.cli.config import flag_overrides
from orchestrator.cli.output import error, print_json, print_json_line, print_line
from orchestrator.core.errors import ConfigError
from orchestrator.core.settings import Settings, load_settings
from orchestrator.lifecycle import control, demo, down, logs, plan, rolling, status, up
from orchestrator.lifecycle.logs import LogLine
from orchestrator.lifecycle.rolling import Serving
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


class Progress:
    """Stage lines as ``up`` runs: one line rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._open = False

    def __call__(self, line: str) -> None:
        if self.tty:
            self.stream.write(f"\r\033[K{line}")
            self.stream.flush()
            self._open = True
        elif not line.endswith("..."):  # a stage or step under way: shown on a terminal only
            print_line(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End the in-place line (before other output)."""
        if self._open:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._open = False


def _print_changes(report: up.UpReport, redact: Callable[[str], str]) -> None:
    changes = report.changes
    total = report.total_seconds
    if changes.started or changes.restarted or changes.removed or changes.rolling:
        print_line(
            f"up in {total:.2f}s: started {', '.join(changes.started) or '-'}; "
            f"restarted {', '.join(changes.restarted) or '-'}; removed {', '.join(changes.removed) or '-'}; "
            f"rolled {', '.join(changes.rolling) or '-'}"
        )
    else:
        print_line(f"up in {total:.2f}s: nothing changed, {len(changes.unchanged)} programs keep running")
    if changes.rolling:
        why = "; ".join(report.reasons) or "their supervisord programs changed"
        print_line(redact(f"rolling {', '.join(changes.rolling)} to generation {report.generation}: {why}"))
    roll = report.roll
    if roll is not None and roll.ok:
        print_line(f"roll done in {roll.seconds:.1f}s: {len(roll.rolled)} instance(s) on generation {roll.generation}")
    elif roll is not None:
        left = f"; {', '.join(roll.left)} keep serving the old generation" if roll.left else ""
        print_line(f"ROLL STOPPED: {roll.failed} did not become READY on generation {roll.generation}: "
                   f"{roll.failure}{left}")


def _print_serving(servings: list[Serving]) -> int:
    for s in servings:
        print_line(f"{s.name} READY {s.url}" if s.ready else f"{s.name} {s.reason}")
    bad = [s for s in servings if not s.ready]
    if bad:
        error(f"not READY on the current generation: {', '.join(s.name for s in bad)}")
        return 1
    return 0


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from orchestrator.cli.models import TqdmBar

    provision_only = bool(getattr(args, "provision_only", False))
    if provision_only and (args.foreground or args.skip_provision or getattr(args, "wait", False)):
        raise ConfigError("up --provision-only starts nothing: drop --foreground, --skip-provision and --wait")
    progress = Progress()
    bar = TqdmBar() if progress.tty else None
    try:
        report = up.up(
            settings,
            overrides=_up_overrides(args),
            foreground=args.foreground,
            skip_provision=args.skip_provision,
            provision_only=provision_only,
            progress=progress,
            models_bar=bar,
        )
    finally:
        if bar is not None:
            bar.close()
        progress.close()
    if provision_only:
        print_line(f"provisioned in {report.total_seconds:.2f}s under {settings.root}: code, nodes and models; "
                   "nothing started")
        return 0
    _print_changes(report, settings.redact)
    code = 0 if report.roll is None or report.roll.ok else 1
    if report.comfy_fallback:
        print_line("WARNING: running the FALLBACK ComfyUI repository (COMFY_REPO_URL could not be cloned)")
    if report.failed_nodes:
        print_line(f"WARNING: custom nodes failed: {', '.join(report.failed_nodes)}")
    for name, why in sorted((report.record.get("nodes", {}).get("import_failed") or {}).items()):
        print_line(f"WARNING: custom node {name} fails at import (checked before start): {why}")
    print_line(f"monitor: http://{settings.orchestrator_listen}:{settings.orchestrator_port}/readyz")
    if getattr(args, "wait", False):
        timeout = args.timeout if args.timeout is not None else settings.startup_timeout
        try:
            servings = up.wait_serving(settings, timeout, progress)
        finally:
            progress.close()
        code = max(code, _print_serving(servings))
    return code


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
    old = f"old generation {row.generation or '?'}" if not row.current else ""
    detail = "; ".join(part for part in (old, row.last_error, failed_nodes) if part)
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
    if data.generation:
        on = sum(1 for r in data.instances if r.current and r.generation)
        print_line(f"generation: {data.generation} ({on}/{len(data.instances)} instances run it)")
    print_line(STATUS_HEADER)
    for row in data.instances:
        print_line(status_line(row))
    failed = data.nodes.get("failed")
    if failed:
        errors = data.nodes.get("errors") or {}
        print_line(f"failed custom nodes ({len(failed)}), retried at the next `up` or `nodes sync`:")
        for name in failed:
            print_line(f"  {name}: {errors.get(name) or 'failed'}")
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
    if getattr(args, "rolling", False):
        progress = Progress()
        try:
            roll = rolling.restart_rolling(settings, args.target, progress)
        finally:
            progress.close()
        if not roll.ok:
            left = f"; {', '.join(roll.left)} not restarted" if roll.left else ""
            error(f"rolling restart stopped: {roll.failed} did not become READY: {roll.failure}{left}")
            return 1
        print_line(f"rolling restart done in {roll.seconds:.1f}s: {', '.join(roll.rolled)}")
        return 0
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

