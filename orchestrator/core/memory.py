"""Instance memory budgets and when to recycle an instance. Pure.

Each instance gets a host-RAM budget (``INSTANCE_MEMORY_MAX``; ``auto``: the host's RAM less
``INSTANCE_MEMORY_RESERVE``, split evenly between the instances). The monitor samples each
instance's RSS (its process tree) and asks :func:`recycle_reason` whether to recycle it —
drain it, then restart it — because it passed the budget's high-water mark
(``INSTANCE_MEMORY_HIGH_WATER``, a fraction of the budget), grew more than
``INSTANCE_MEMORY_GROWTH_MAX`` since its process started, or ran ``RECYCLE_AFTER_JOBS`` prompts.
"""

from __future__ import annotations

import dataclasses
import enum

from orchestrator.core.disk import parse_size


class RecycleReason(enum.Enum):
    """The ``reason`` label of ``comfyui_instance_recycles_total``."""

    MEMORY = "memory"  # RSS at or past the budget's high-water mark
    GROWTH = "growth"  # RSS grew more than the allowed amount since the process started
    JOBS = "jobs"  # ran RECYCLE_AFTER_JOBS prompts


@dataclasses.dataclass(frozen=True)
class MemoryPolicy:
    """When an instance is recycled (``None``/0: that rule is off)."""

    budget: int | None = None  # bytes: the instance's host-RAM budget
    high_water: float = 0.9  # fraction of the budget that triggers a recycle
    growth_max: int | None = None  # bytes of RSS growth since the process started
    jobs_max: int | None = None  # prompts run by one process

    @property
    def high_water_bytes(self) -> int | None:
        return None if not self.budget else int(self.budget * self.high_water)

    @property
    def active(self) -> bool:
        return bool(self.budget or self.growth_max or self.jobs_max)


def to_memory_max(raw: str) -> int | None:
    """``auto`` → -1 (split the host's RAM), ``off``/``0`` → None, else a size such as 24G."""
    text = raw.strip().lower()
    if text in {"", "auto"}:
        return -1
    if text in {"off", "0", "none"}:
        return None
    value = parse_size(raw)
    if value <= 0:
        raise ValueError("expected auto, off, or a size such as 24G")
    return value


def to_fraction(raw: str) -> float:
    """A fraction in (0, 1]: ``0.9`` or ``90%``."""
    text = raw.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError("expected a fraction such as 0.9 or 90%") from None
    if not 0 < value <= 1:
        raise ValueError("expected a fraction above 0 and at most 1 (or 100%)")
    return value


def to_optional_size(raw: str) -> int | None:
    """Empty or ``off`` → None, else a size greater than 0."""
    if raw.strip().lower() in {"", "off", "0"}:
        return None
    value = parse_size(raw)
    if value <= 0:
        raise ValueError("expected a size such as 4G, or off")
    return value


def instance_budget(setting: int | None, host_total: int, instances: int, reserve: int) -> int | None:
    """The budget of one instance: the setting, or (``auto``) (host RAM − reserve) / instances.

    ``auto`` on a host too small to leave anything after the reserve gives no budget (None).
    """
    if setting is None:
        return None
    if setting > 0:
        return setting
    share = (host_total - reserve) // max(1, instances)
    return share if share > 0 else None


def recycle_reason(policy: MemoryPolicy, rss: int, rss_at_start: int, jobs: int) -> RecycleReason | None:
    """Why to recycle an instance with ``rss`` bytes now, ``rss_at_start`` when its process started
    and ``jobs`` prompts run by that process; None to keep it. The budget comes first."""
    high = policy.high_water_bytes
    if high is not None and rss >= high:
        return RecycleReason.MEMORY
    if policy.growth_max and rss - rss_at_start > policy.growth_max:
        return RecycleReason.GROWTH
    if policy.jobs_max and jobs >= policy.jobs_max:
        return RecycleReason.JOBS
    return None


def describe(reason: RecycleReason, policy: MemoryPolicy, rss: int, rss_at_start: int, jobs: int) -> str:
    """One line for the log and the instance's reason."""
    mib = 1 << 20
    if reason is RecycleReason.MEMORY:
        return (f"RSS {rss // mib} MiB reached {policy.high_water:.0%} of its {(policy.budget or 0) // mib} MiB "
                "budget (INSTANCE_MEMORY_MAX)")
    if reason is RecycleReason.GROWTH:
        return (f"RSS grew {(rss - rss_at_start) // mib} MiB since start, over "
                f"{(policy.growth_max or 0) // mib} MiB (INSTANCE_MEMORY_GROWTH_MAX)")
    return f"ran {jobs} prompts (RECYCLE_AFTER_JOBS={policy.jobs_max})"
