"""Lifecycle commands: up, down, status, start/stop/restart, logs, gpus, plan."""

from __future__ import annotations

import argparse

from orchestrator import gpu as gpu_mod
from orchestrator.paths import Layout
from orchestrator.plan import MachinePlan, build_plan, supported_flags
from orchestrator.settings import Settings


def make_plan(settings: Settings) -> MachinePlan:
    gpus = gpu_mod.detect(settings)
    return build_plan(settings, gpus, supported_flags(Layout(settings.root).comfy_dir))


def cmd_gpus(settings: Settings, args: argparse.Namespace) -> int:
    from orchestrator.cli import print_json

    gpus = gpu_mod.detect(settings)
    if args.json:
        print_json([g.to_dict() for g in gpus])
        return 0
    for g in gpus:
        print(f"{g.index}  {g.uuid}  {g.pci_bus_id}  {g.name}  {g.memory_total // 2**20} MiB  driver {g.driver_version}")
    return 0


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    from orchestrator.cli import print_json

    plan = make_plan(settings)
    if args.json:
        print_json(plan.to_dict())
        return 0
    for inst in plan.instances:
        print(f"{inst.name}  gpu {inst.index} ({inst.gpu.uuid})  port {inst.port}")
        print(f"    {' '.join(inst.argv)}")
    return 0
