"""`runpod-worker`: the RunPod serverless handler over the local job API."""

from __future__ import annotations

import argparse
import sys

from orchestrator.core.settings import Settings
from orchestrator.jobs.runpod import ReadyConcurrency, import_runpod, make_handler


def sdk_argv(args: argparse.Namespace) -> list[str]:
    """The RunPod SDK's flags from our parsed arguments, as the SDK reads them from sys.argv."""
    argv: list[str] = []
    for name in ("test_input", "rp_log_level", "rp_api_port", "rp_api_host"):
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name}", str(value)]
    if getattr(args, "rp_serve_api", False):
        argv.append("--rp_serve_api")
    return argv + [a for a in (getattr(args, "runpod_args", None) or []) if a != "--"]


def cmd_runpod_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Run the RunPod serverless worker loop (or one ``--test_input`` job) over the local job API."""
    runpod = import_runpod()
    # The SDK reads its own flags (--test_input, --rp_serve_api, …) from sys.argv.
    sys.argv = [sys.argv[0], *sdk_argv(args)]
    # As many jobs at once as READY instances (GET /scaling), re-read as instances come and go.
    runpod.serverless.start({"handler": make_handler(settings), "concurrency_modifier": ReadyConcurrency(settings)})
    return 0
