"""Hung reports and restart requests arrive from other threads: none may be lost to a race."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

from orchestrator.core.health import Action, ProbeResult
from orchestrator.core.plan import build_plan
from orchestrator.core.settings import load_settings
from orchestrator.machine.gpu import MockBackend
from orchestrator.machine.state import create_instance_dirs
from orchestrator.monitor.loop import Monitor
from orchestrator.monitor.slots import Slot


def _monitor(tmp_path: Path) -> Monitor:
    settings = load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1", "NUM_GPUS": "1"})
    backend = MockBackend(1, 2**30)
    plan = build_plan(settings, backend.list_gpus())
    create_instance_dirs(plan)
    return Monitor(settings, plan, supervisor_factory=lambda timeout: None, backend_factory=lambda: backend)  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("field", ["hung", "restart_requested"])
def test_a_report_arriving_between_the_read_and_the_clear_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    monitor = _monitor(tmp_path)
    slot = monitor._slots[0]
    report = monitor.report_hung if field == "hung" else monitor.request_restart
    report(0, "first report")
    reporters: list[threading.Thread] = []

    def report_again() -> None:
        report(0, "second report")

    class Hooked(type(slot)):  # type: ignore[misc]
        """The first read of ``field`` inside the check lets another thread report meanwhile."""

        def __getattribute__(self, name: str) -> Any:
            value = object.__getattribute__(self, name)
            if name == field and value == "first report" and not reporters:
                t = threading.Thread(target=report_again, daemon=True)
                reporters.append(t)
                t.start()
                lock = object.__getattribute__(self, "__dict__").get("requests_lock")
                if lock is None or not lock.locked():
                    t.join()  # nothing serialises the report: it lands between the read and the clear
            return value

    slot.__class__ = Hooked

    async def probe(slot: Any, proc: Any) -> ProbeResult:
        return ProbeResult(ok=True)

    async def act(inst: Any, action: Action) -> str:
        return ""

    monkeypatch.setattr(monitor.loop, "_probe", probe)
    monkeypatch.setattr(monitor.loop, "_act", act)
    try:
        asyncio.run(monitor.loop._check(slot, None, 0.0))
        assert reporters, "the check never read the hung report"
        assert wait_until(lambda: not reporters[0].is_alive(), 30)
        # The first report was taken by this check; the second is pending for the next one.
        assert slot.__dict__[field] == "second report"
        assert slot.due(None, monitor._clock(), known=False)
    finally:
        slot.__class__ = Slot
        asyncio.run(monitor.close())
