"""`nodes sync` and `nodes validate`.

TODO(redesign): these delegate to the service modules' old handlers until the handler bodies move here."""

from __future__ import annotations

import argparse

from orchestrator.core.settings import Settings
from orchestrator.provision import nodes as _nodes


def cmd_nodes_sync(settings: Settings, args: argparse.Namespace) -> int:
    return _nodes.cmd_sync(settings, args)


def cmd_nodes_validate(settings: Settings, args: argparse.Namespace) -> int:
    return _nodes.cmd_validate(settings, args)
