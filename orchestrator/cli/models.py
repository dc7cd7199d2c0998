"""`models sync`, `models status` and `cleanup`.

TODO(redesign): these delegate to the service modules' old handlers until the handler bodies move here."""

from __future__ import annotations

import argparse

from orchestrator.core.settings import Settings
from orchestrator.provision import cleanup as _cleanup
from orchestrator.provision.models import sync as _sync


def cmd_models_sync(settings: Settings, args: argparse.Namespace) -> int:
    return _sync.cmd_sync(settings, args)


def cmd_models_status(settings: Settings, args: argparse.Namespace) -> int:
    return _sync.cmd_status(settings, args)


def cmd_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    return _cleanup.cmd_cleanup(settings, args)
