"""Settings from the command line: the flags as setting overrides, and the ``config`` command."""

from __future__ import annotations

import argparse
import os

from orchestrator.cli.output import print_json, print_line
from orchestrator.core.errors import ConfigError
from orchestrator.core.settings import Settings


def flag_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The settings given as flags (``--set NAME=VALUE``, ``--root``, ``--log-*``): the highest precedence.

    Raises:
        ConfigError: a ``--set`` that is not ``NAME=VALUE``.
    """
    flags: dict[str, str] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"invalid --set {item!r}: expected NAME=VALUE")
        flags[name.strip().upper()] = value
    if args.root:
        flags["ROOT"] = args.root
    if args.log_format:
        flags["LOG_FORMAT"] = args.log_format
    if args.log_level:
        flags["LOG_LEVEL"] = args.log_level
    if getattr(args, "locked", None) is not None:  # up --locked [FILE]
        flags["LOCKFILE"] = os.path.abspath(args.locked or os.environ.get("LOCKFILE") or "orchestrator.lock")
    if args.command == "demo":
        flags.setdefault("NUM_GPUS", str(args.gpus))
    return flags


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    rows = settings.effective()
    if args.json:
        print_json({r["name"]: {"value": r["value"], "source": r["source"]} for r in rows})
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        value = r["value"]
        shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        print_line(f"{r['name']:<{width}}  {shown:<40}  ({r['source']})")
    return 0
