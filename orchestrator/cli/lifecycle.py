"""Lifecycle commands: up, down, status, start/stop/restart, logs, gpus, plan, demo.

TODO(redesign): these delegate to the service modules' old handlers until the handler bodies move here."""

from __future__ import annotations

import argparse

from orchestrator.core.settings import Settings
from orchestrator.lifecycle import demo as _demo
from orchestrator.lifecycle import service as _service


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_up(settings, args)


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_down(settings, args)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_status(settings, args)


def cmd_control(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_control(settings, args)


def cmd_logs(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_logs(settings, args)


def cmd_gpus(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_gpus(settings, args)


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    return _service.cmd_plan(settings, args)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    return _demo.cmd_demo(settings, args)
