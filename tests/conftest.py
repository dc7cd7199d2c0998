"""Fixtures and pytest hooks only; the helpers they use (and tests import) live in ``support.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Machine, simulated_machine

from orchestrator.machine.ports import free_port_block


@pytest.fixture
def port_base() -> int:
    return free_port_block(8)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """machine(num_gpus=2, **env) → a Machine whose ComfyUI is the simulator; always brought down."""
    made: list[Machine] = []

    def make(num_gpus: int = 2, **extra_env: str) -> Machine:
        m = simulated_machine(tmp_path / f"m{len(made)}", num_gpus, **extra_env)
        made.append(m)
        return m

    yield make
    for m in made:
        m.down()


# ---------------------------------------------------------------- the real tier (tests/real, tests/conformance)
def pytest_configure(config: pytest.Config) -> None:
    # `-n 2` distributes test by test; real-ComfyUI tests carry xdist_group so that they all run on
    # one worker, one machine at a time (each real instance is ~0.8 GB and a core while starting).
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    """One visible line when the real tier skipped (never silently), whatever -r says."""
    reasons: dict[str, int] = {}
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(rep, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
        if "real tier:" in reason:
            reason = reason[reason.index("real tier:"):]
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"SKIPPED {count} real-ComfyUI tests: {reason}", yellow=True)
