"""`serve` (the monitor) and `health` (the container health check).

TODO(redesign): these delegate to the service modules' old handlers until the handler bodies move here."""

from __future__ import annotations

import argparse

from orchestrator.core.settings import Settings
from orchestrator.monitor import service as _service


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_serve(settings, args)


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_health(settings, args)
