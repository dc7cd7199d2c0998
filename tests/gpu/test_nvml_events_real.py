"""GPU tier: the fault-event listener registers on a real device, and stops within its wait; the
dcgm health fields NVML supplies come back. Skips itself without a driver."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from orchestrator.core.gpufaults import GpuEvent
from orchestrator.machine.gpu import NvmlBackend
from orchestrator.machine.nvml_events import NvmlEventListener, open_listener

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA driver (nvidia-smi missing)"),
]


def test_the_xid_listener_registers_on_every_gpu_and_stops_cleanly() -> None:
    backend = NvmlBackend()
    try:
        gpus = backend.list_gpus()
        listener = open_listener(backend, gpus)
        assert isinstance(listener, NvmlEventListener)
        events: list[GpuEvent] = []
        registered = listener.start(events.append)
        print(json.dumps(registered))
        # Xid critical errors are reported by every data-centre GPU NVML supports.
        assert registered == {g.index: "" for g in gpus}
        time.sleep(1.5)  # a few waits time out on a healthy GPU: no event, no error
        started = time.monotonic()
        listener.stop(timeout=10)
        assert time.monotonic() - started < 5  # one nvmlEventSetWait of 0.5 s at most, not a hang
        assert events == []  # a healthy GPU reports no Xid
    finally:
        backend.close()


def test_the_dcgm_health_fields_nvml_supplies_are_read() -> None:
    backend = NvmlBackend()
    try:
        gpus = backend.list_gpus()
        sample = backend.sample(gpus)[0]
        print(json.dumps(sample.to_dict(), default=str))
        assert not sample.failed
        # Volta and later report energy and the PCIe replay counter; a missing one is omitted, never 0.
        assert sample.total_energy is not None
        assert sample.total_energy > 0
        assert sample.pcie_replay is not None
        assert sample.throttle_reasons is not None
    finally:
        backend.close()
