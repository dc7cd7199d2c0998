"""`serve` (the monitor) and `health` (the container health check)."""

from __future__ import annotations

import argparse
import logging

from orchestrator.cli.output import print_line
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.monitor.healthcheck import check_health
from orchestrator.monitor.preflight import check_start

log = logging.getLogger(__name__)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    # Imported here: `orchestrator health` (this module too) must not load the web stack.
    from orchestrator.monitor.app import bind_socket, load_plan, run_loop, serve

    check_start(settings)
    plan = load_plan(Layout(settings.root))
    sock = bind_socket(settings.orchestrator_listen, settings.orchestrator_port)
    log.info("monitor listening on http://%s:%d", settings.orchestrator_listen, settings.orchestrator_port)
    try:
        run_loop(serve(settings, plan, sock))
    finally:
        sock.close()
    return 0


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    result = check_health(settings, live=bool(getattr(args, "live", False)))
    print_line(result.message)
    return 0 if result.ok else 1
