"""The ``orchestrator`` command: parse, build settings, call a service, render output.

The argparse tree is here; each command's thin handler lives in the ``cli`` module of its
area and is imported directly, inside :func:`handler_for`, so that ``orchestrator health``
(a container health check run every few seconds) does not import the monitor's web stack.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator import __version__
from orchestrator.cli import config
from orchestrator.cli.logconfig import setup_logging
from orchestrator.cli.output import error, note
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings, load_settings

Handler = Callable[[Settings, argparse.Namespace], int]

# Every command path the parser knows (the `help` test walks them).
COMMANDS = (
    "up", "down", "status", "start", "stop", "restart", "logs", "gpus", "plan", "config",
    "nodes sync", "nodes validate", "models sync", "models status", "cleanup", "health", "serve",
    "demo", "runpod-worker", "lock", "drift", "worker", "submit", "fleet status",
)


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _duration(text: str) -> float:
    from orchestrator.core.converters import to_positive_duration

    try:
        return float(to_positive_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Run one ComfyUI per GPU under supervisord, watched and measured.",
    )
    parser.add_argument("--version", action="version", version=f"orchestrator {__version__}")
    parser.add_argument("--root", help="root directory (ROOT, default /workspace)")
    parser.add_argument("--config", type=Path, help="YAML settings file (ORCHESTRATOR_CONFIG)")
    parser.add_argument(
        "--set", "-s", action="append", default=[], metavar="NAME=VALUE",
        help="override a setting (highest precedence); repeatable",
    )
    parser.add_argument("--log-format", choices=("text", "json"), help="log format (LOG_FORMAT)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("up", help="prepare the machine and start every instance under supervisord")
    p.add_argument("--foreground", action="store_true", help="exec supervisord in the foreground (containers)")
    p.add_argument("--skip-provision", action="store_true", help="do not fetch code, nodes or models")
    p.add_argument(
        "--provision-only", action="store_true",
        help="fetch code, nodes and models, start nothing (bake ROOT into an image at build time)",
    )
    p.add_argument("--wait", action="store_true", help="return when every instance is READY on the new generation")
    p.add_argument("--timeout", type=_duration, help="with --wait: give up after this (default STARTUP_TIMEOUT)")
    p.add_argument(
        "--locked", nargs="?", const="", metavar="FILE",
        help="install exactly the lock (FILE, else LOCKFILE, else ./orchestrator.lock); "
        "fail before any change if it cannot",
    )
    p = sub.add_parser("down", help="stop every instance, the monitor and supervisord")
    p = sub.add_parser("status", help="per instance: GPU, port, pid, state, uptime, restarts, health")
    _json_flag(p)
    for verb in ("start", "stop", "restart"):
        p = sub.add_parser(verb, help=f"{verb} one instance (GPU index) or all")
        p.add_argument("target", metavar="GPU|all")
        if verb == "restart":
            p.add_argument("--rolling", action="store_true", help="one at a time, each drained first")
    p = sub.add_parser("logs", help="show an instance's log (all: merged with a GPU prefix)")
    p.add_argument("target", metavar="GPU|all")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    p.add_argument("--json", action="store_true", help='one JSON object per line: {"gpu": N, "line": "..."}')
    p = sub.add_parser("gpus", help="list the GPUs this machine would use")
    _json_flag(p)
    p = sub.add_parser("plan", help="dry run: the instances `up` would start")
    _json_flag(p)
    p = sub.add_parser("config", help="effective settings and where each came from (secrets redacted)")
    _json_flag(p)

    nodes = sub.add_parser("nodes", help="custom nodes from config_nodes.json")
    nsub = nodes.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = nsub.add_parser("sync", help="install, update and remove custom nodes")
    p.add_argument("--dry-run", action="store_true", help="print the actions only")
    p.add_argument("--prune", action="store_true", help="also remove node folders this tool did not install")
    p.add_argument("--file", type=Path, help="config file (default: from the shared repo)")
    _json_flag(p)
    p = nsub.add_parser("validate", help="schema and safety checks of a config file, no network")
    p.add_argument("file", type=Path)
    _json_flag(p)

    models = sub.add_parser("models", help="model tree and downloads")
    msub = models.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = msub.add_parser("sync", help="create the model tree and download models")
    p.add_argument("--dry-run", action="store_true", help="list files, destinations and actions only")
    p.add_argument(
        "--tier", choices=("before_start", "background", "all"), default="all",
        help="which manifest entries to fetch (default all)",
    )
    _json_flag(p)
    p = msub.add_parser("status", help="download progress")
    _json_flag(p)

    p = sub.add_parser("cleanup", help="delete old outputs (runs under supervisord)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    _json_flag(p)
    p = sub.add_parser("health", help="exit 0 when ready (for container health checks)")
    p.add_argument("--live", action="store_true", help="exit 0 when the monitor is alive")
    p = sub.add_parser("serve", help="run the monitor (health checks, metrics, control API)")
    p = sub.add_parser("demo", help="the full pipeline offline with simulated GPUs")
    p.add_argument("--gpus", type=int, default=2, help="number of simulated GPUs (default 2)")
    p = sub.add_parser("runpod-worker", help="RunPod serverless handler over the local job API")
    # The RunPod SDK's own flags (it reads them from sys.argv); declared so they parse anywhere.
    p.add_argument("--test_input", metavar="JSON", help="run one job with this RunPod input, then exit")
    p.add_argument("--rp_log_level", choices=("ERROR", "WARN", "INFO", "DEBUG"), help="RunPod SDK log level")
    p.add_argument("--rp_serve_api", action="store_true", help="serve the SDK's local test API instead")
    p.add_argument("--rp_api_port", type=int, help="port of the SDK's local test API (default 8000)")
    p.add_argument("--rp_api_host", help="host of the SDK's local test API (default localhost)")
    p.add_argument("runpod_args", nargs=argparse.REMAINDER, help="further RunPod SDK arguments (after --)")
    p = sub.add_parser("lock", help="write orchestrator.lock: ComfyUI and node commits, packages, models")
    p.add_argument("-o", "--output", type=Path, help="where to write (default: LOCKFILE, else ./orchestrator.lock)")
    _json_flag(p)
    p = sub.add_parser("drift", help="every difference between this machine and a lock (exit 1 if any)")
    p.add_argument(
        "--lock", type=Path, help="lock file (default: LOCKFILE, the last up --locked's, ./orchestrator.lock)"
    )
    _json_flag(p)
    queue_help = "Redis job queue URL (default JOB_QUEUE_URL; on the command line it is visible in ps)"
    p = sub.add_parser("worker", help="take jobs from the fleet's Redis queue for this machine")
    p.add_argument("--queue", metavar="URL", help=queue_help)
    p = sub.add_parser("submit", help="queue a job on the fleet (Redis) and wait for its result")
    p.add_argument("file", help="JSON file (- for stdin): a POST /jobs body or a workflow in API format")
    p.add_argument("--queue", metavar="URL", help=queue_help)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the result (default 600)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    _json_flag(p)
    fleet = sub.add_parser("fleet", help="the machines taking jobs from the Redis queue")
    fsub = fleet.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = fsub.add_parser("status", help="every live machine: GPUs, ready instances, free slots; queue counts")
    p.add_argument("--queue", metavar="URL", help=queue_help)
    _json_flag(p)
    return parser


def _command_key(args: argparse.Namespace) -> str:
    sub = getattr(args, "subcommand", None)
    return f"{args.command} {sub}" if sub else str(args.command)


def handler_for(key: str) -> Handler:  # noqa: C901, PLR0911 - one branch per command
    """The handler of a command path (``"nodes sync"``); its module is imported only here."""
    if key in {"up", "down", "status", "start", "stop", "restart", "logs", "gpus", "plan", "demo"}:
        from orchestrator.cli import lifecycle

        return {
            "up": lifecycle.cmd_up, "down": lifecycle.cmd_down, "status": lifecycle.cmd_status,
            "start": lifecycle.cmd_control, "stop": lifecycle.cmd_control, "restart": lifecycle.cmd_control,
            "logs": lifecycle.cmd_logs, "gpus": lifecycle.cmd_gpus, "plan": lifecycle.cmd_plan,
            "demo": lifecycle.cmd_demo,
        }[key]
    if key in {"nodes sync", "nodes validate"}:
        from orchestrator.cli import nodes

        return nodes.cmd_nodes_sync if key == "nodes sync" else nodes.cmd_nodes_validate
    if key in {"models sync", "models status", "cleanup"}:
        from orchestrator.cli import models

        return {"models sync": models.cmd_models_sync, "models status": models.cmd_models_status,
                "cleanup": models.cmd_cleanup}[key]
    if key in {"serve", "health"}:
        from orchestrator.cli import monitor

        return monitor.cmd_serve if key == "serve" else monitor.cmd_health
    if key == "runpod-worker":
        from orchestrator.cli import jobs

        return jobs.cmd_runpod_worker
    if key in {"lock", "drift"}:
        from orchestrator.cli import lock

        return lock.cmd_lock if key == "lock" else lock.cmd_drift
    if key in {"worker", "submit", "fleet status"}:
        from orchestrator.cli import fleet as fleet_cli

        return {"worker": fleet_cli.cmd_worker, "submit": fleet_cli.cmd_submit,
                "fleet status": fleet_cli.cmd_fleet_status}[key]
    if key == "config":
        return config.cmd_config
    raise KeyError(key)


# Commands that change the machine: only these may create $ROOT/logs (and so $ROOT). Every
# other command logs to $ROOT/logs/orchestrator.log only when that folder already exists.
CREATES_ROOT = frozenset({"up", "nodes sync", "models sync", "cleanup", "serve", "runpod-worker", "demo", "worker"})
# Read-only commands that, given no ROOT at all, look at a running `orchestrator demo`.
FOLLOWS_DEMO = frozenset({"status", "gpus", "plan", "logs", "health", "config"})


def _with_running_demo(settings: Settings, args: argparse.Namespace) -> Settings:
    """ROOT (and MOCK_GPU, NUM_GPUS, ports) of a running demo when none was given anywhere."""
    if settings.sources.get("ROOT") != "default":
        return settings
    from orchestrator.machine.state import running_demo

    demo = running_demo()
    if demo is None:
        return settings
    extra = {k: v for k, v in demo.items() if settings.sources.get(k) == "default"}
    note(f"note: ROOT is not set: using the running demo's root {demo['ROOT']}")
    return load_settings(os.environ, {**extra, **config.flag_overrides(args)}, args.config)


def _with_demo_root(settings: Settings, args: argparse.Namespace) -> Settings:
    """``demo`` given no ROOT anywhere runs in a fresh temporary folder (chosen before logging
    is set up, so that the demo's log file is there from the first line)."""
    if settings.sources.get("ROOT") != "default":
        return settings
    root = tempfile.mkdtemp(prefix="orchestrator-demo-")
    return load_settings(os.environ, {**config.flag_overrides(args), "ROOT": root}, args.config)


def _log_file(settings: Settings, key: str, args: argparse.Namespace) -> Path | None:
    if key in {"config", "gpus", "plan", "nodes validate", "health"}:
        return None
    layout = Layout(settings.root)
    may_create = key in CREATES_ROOT and not getattr(args, "dry_run", False)
    return layout.orchestrator_log if may_create or layout.logs_dir.is_dir() else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    key = _command_key(args)
    settings: Settings | None = None
    try:
        settings = load_settings(os.environ, config.flag_overrides(args), args.config)
        if key in FOLLOWS_DEMO:
            settings = _with_running_demo(settings, args)
        elif key == "demo":
            settings = _with_demo_root(settings, args)
        # The one place logging is configured: the process's entry point. Undone on return, so
        # main() called in-process (tests) leaves the logging it found.
        with setup_logging(
            fmt=settings.log_format,
            level=settings.log_level,
            secrets=settings.secret_values,
            log_file=_log_file(settings, key, args),
        ):
            return handler_for(key)(settings, args)
    except OrchestratorError as exc:
        message = str(exc).replace("\n", " ")
        if settings is not None:
            message = settings.redact(message)
        error(message)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def entrypoint() -> None:
    sys.exit(main())
