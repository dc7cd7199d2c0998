"""The read-only commands' services: the GPUs this machine would use and the plan ``up`` would apply."""

from __future__ import annotations

from orchestrator.core.gpus import Gpu
from orchestrator.core.layout import Layout
from orchestrator.core.plan import MachinePlan, build_plan, supported_flags
from orchestrator.core.settings import Settings
from orchestrator.machine import gpu as gpu_mod


def detect_gpus(settings: Settings) -> list[Gpu]:
    """The GPUs selected for instances (``nvidia-smi -L``, filtered by the GPU settings)."""
    return gpu_mod.detect(settings)


def make_plan(settings: Settings) -> MachinePlan:
    """What ``up`` would start now: one instance per selected GPU, nothing written."""
    gpus = gpu_mod.detect(settings)
    return build_plan(settings, gpus, supported_flags(Layout(settings.root).comfy_dir))
