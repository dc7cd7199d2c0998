"""`runpod-worker`: the RunPod serverless handler over the local job API.

TODO(redesign): these delegate to the service modules' old handlers until the handler bodies move here."""

from __future__ import annotations

import argparse

from orchestrator.core.settings import Settings
from orchestrator.jobs import runpod as _runpod


def cmd_runpod_worker(settings: Settings, args: argparse.Namespace) -> int:
    return _runpod.cmd_runpod_worker(settings, args)
