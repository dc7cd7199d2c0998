from __future__ import annotations

import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.errors import ConfigError, GpuError
from orchestrator.core.gpufaults import EventKind, GpuEvent
from orchestrator.core.settings import load_settings
from orchestrator.machine.gpu import MockBackend, NvmlBackend, detect, open_backend, select_gpus
from orchestrator.machine.nvml_events import DOUBLE_BIT_ECC, XID_CRITICAL, NvmlEventListener, open_listener


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"nvml error {value}")
        self.value = value


def fake_pynvml(*, init_fails: bool = False, lost_uuid: str = "", unsupported: tuple[str, ...] = ()) -> Any:
    """A recording stand-in for the pynvml module with two GPUs."""
    m = types.SimpleNamespace()
    m.NVMLError = NVMLError
    m.NVML_ERROR_NOT_SUPPORTED = 3
    m.NVML_ERROR_GPU_IS_LOST = 15
    m.NVML_ERROR_UNKNOWN = 999
    m.NVML_TEMPERATURE_GPU = 0
    m.NVML_CLOCK_SM = 1
    m.NVML_CLOCK_MEM = 2
    m.calls = []
    gpus = [
        {"uuid": "GPU-aaaa", "bus": "00000000:17:00.0", "name": "NVIDIA H100 80GB HBM3", "mem": 80 * 2**30},
        {"uuid": "GPU-bbbb", "bus": "00000000:65:00.0", "name": "NVIDIA H100 80GB HBM3", "mem": 80 * 2**30},
    ]

    def init() -> None:
        m.calls.append("init")
        if init_fails:
            raise NVMLError(9)

    def check(handle: dict[str, Any], field: str) -> None:
        if handle["uuid"] == lost_uuid:
            raise NVMLError(15)
        if field in unsupported:
            raise NVMLError(3)

    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    m.nvmlDeviceGetHandleByUUID = lambda u: next(g for g in gpus if g["uuid"] == u)
    m.nvmlDeviceGetUUID = lambda h: h["uuid"]
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=h["bus"].encode())
    m.nvmlDeviceGetName = lambda h: h["name"]

    def mem(h: dict[str, Any]) -> Any:
        check(h, "memory")
        return types.SimpleNamespace(total=h["mem"], used=2**30, free=h["mem"] - 2**30)

    def util(h: dict[str, Any]) -> Any:
        check(h, "utilization")
        return types.SimpleNamespace(gpu=42, memory=10)

    def temp(h: dict[str, Any], _s: int) -> int:
        check(h, "temperature")
        return 55

    def power(h: dict[str, Any]) -> int:
        check(h, "power")
        return 250_000

    def clock(h: dict[str, Any], kind: int) -> int:
        check(h, "clock")
        return 1980 if kind == 1 else 2619

    m.nvmlDeviceGetMemoryInfo = mem
    m.nvmlDeviceGetUtilizationRates = util
    m.nvmlDeviceGetTemperature = temp
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetClockInfo = clock
    return m


def with_health_and_events(m: Any, *, unsupported: tuple[str, ...] = (), no_xid: str = "") -> Any:
    """Add the dcgm health calls and an event set (events pushed into ``m.pending``) to a fake."""
    m.NVML_ERROR_TIMEOUT = 10
    m.NVML_FI_DEV_MEMORY_TEMP = 82
    m.pending = []
    m.registered = {}
    m.freed = False

    def maybe(name: str, value: Any) -> Any:
        def call(*_a: Any) -> Any:
            if name in unsupported:
                raise NVMLError(3)
            return value
        return call

    m.nvmlDeviceGetTotalEnergyConsumption = maybe("energy", 123_456_789)
    m.nvmlDeviceGetPcieReplayCounter = maybe("pcie", 7)
    m.nvmlDeviceGetTotalEccErrors = lambda h, kind, counter: (
        _raise(NVMLError(3)) if "ecc" in unsupported else 10 * (kind + 1) + counter
    )
    m.nvmlDeviceGetRemappedRows = maybe("rows", (2, 1, 0, 1))
    m.nvmlDeviceGetViolationStatus = lambda h, p: types.SimpleNamespace(violationTime=(p + 1) * 5_000_000)
    m.nvmlDeviceGetCurrentClocksEventReasons = maybe("throttle", 0x4)
    m.nvmlDeviceGetComputeRunningProcesses = maybe(
        "procs", [types.SimpleNamespace(pid=4242, usedGpuMemory=3 * 2**30)]
    )
    field = types.SimpleNamespace(nvmlReturn=3 if "memtemp" in unsupported else 0,
                                  value=types.SimpleNamespace(uiVal=71))
    m.nvmlDeviceGetFieldValues = lambda h, ids: [field]
    m.nvmlEventSetCreate = lambda: "set-1"
    m.nvmlDeviceGetSupportedEventTypes = lambda h: 0x0 if h["uuid"] == no_xid else 0xFFFF

    def register(h: dict[str, Any], mask: int, event_set: str) -> None:
        m.registered[h["uuid"]] = mask

    def wait(event_set: str, timeout_ms: int) -> Any:
        if m.pending:
            return m.pending.pop(0)
        time.sleep(timeout_ms / 1000)
        raise NVMLError(10)

    def free(event_set: str) -> None:
        m.freed = True

    m.nvmlDeviceRegisterEvents = register
    m.nvmlEventSetWait_v2 = wait
    m.nvmlEventSetFree = free
    return m


def _raise(exc: Exception) -> Any:
    raise exc


def test_nvml_lists_every_gpu_with_identity_and_inits_once() -> None:
    nvml = fake_pynvml()
    backend = NvmlBackend(nvml)
    gpus = backend.list_gpus()
    backend.list_gpus()
    assert [g.uuid for g in gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert gpus[1].pci_bus_id == "00000000:65:00.0"
    assert gpus[1].index == 1
    assert gpus[0].driver_version == "550.54.15"
    assert gpus[0].memory_total == 80 * 2**30
    backend.close()
    assert nvml.calls == ["init", "shutdown"]


def test_no_driver_is_one_clear_error_with_the_mock_hint() -> None:
    backend = NvmlBackend(fake_pynvml(init_fails=True))
    with pytest.raises(GpuError, match=r"no NVIDIA driver found \(NVML: .*\); set MOCK_GPU=1 to run CPU instances"):
        backend.list_gpus()


def test_an_unsupported_field_is_omitted_for_that_field_only() -> None:
    backend = NvmlBackend(fake_pynvml(unsupported=("power", "temperature")))
    sample = backend.sample(backend.list_gpus())[0]
    assert sample.power is None
    assert sample.temperature is None
    assert sample.utilization == 42.0
    assert sample.memory_used == 2**30
    assert sample.sm_clock == 1980.0
    assert not sample.failed
    assert "power" not in sample.to_dict()


def test_a_lost_gpu_is_marked_failed_and_the_others_are_still_sampled() -> None:
    nvml = fake_pynvml()
    backend = NvmlBackend(nvml)
    gpus = backend.list_gpus()
    nvml_lost = fake_pynvml(lost_uuid="GPU-aaaa")
    backend._nvml = nvml_lost  # the same process, the GPU falls off the bus
    backend._handles.clear()
    samples = backend.sample(gpus)
    assert samples[0].failed
    assert "15" in samples[0].error
    assert not samples[1].failed
    assert samples[1].utilization == 42.0


def test_mock_auto_falls_back_only_when_asked() -> None:
    s = load_settings({"MOCK_GPU": "auto", "NUM_GPUS": "2"})
    assert isinstance(open_backend(s, fake_pynvml(init_fails=True)), MockBackend)
    s = load_settings({"MOCK_GPU": "0"})
    with pytest.raises(GpuError):
        detect(s, open_backend(s, fake_pynvml(init_fails=True)))


def test_mock_gpus_have_stable_uuids_and_configurable_memory() -> None:
    s = load_settings({"MOCK_GPU": "1", "TEST_GPUS": "3", "MOCK_GPU_MEMORY_MB": "1024"})
    a, b = detect(s), detect(s)
    assert [g.uuid for g in a] == [g.uuid for g in b]
    assert len({g.uuid for g in a}) == 3
    assert all(g.memory_total == 2**30 and "Mock" in g.name and g.mock for g in a)


def test_selection_by_index_and_uuid_and_the_cap() -> None:
    gpus = NvmlBackend(fake_pynvml()).list_gpus()
    assert [g.index for g in select_gpus(gpus, load_settings({"GPUS": "1"}))] == [1]
    assert [g.index for g in select_gpus(gpus, load_settings({"GPUS": "gpu-bbbb,0"}))] == [0, 1]
    assert [g.index for g in select_gpus(gpus, load_settings({"NUM_GPUS": "1"}))] == [0]
    with pytest.raises(ConfigError, match="no GPU '7'"):
        select_gpus(gpus, load_settings({"GPUS": "7"}))
    with pytest.raises(ConfigError, match="GPU-nope"):
        select_gpus(gpus, load_settings({"GPUS": "GPU-nope"}))


def test_gpus_without_a_driver_exits_non_zero_with_the_hint() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MOCK_GPU"}
    r = subprocess.run([sys.executable, "-m", "orchestrator", "gpus"], env=env, capture_output=True, text=True)
    if r.returncode == 0:
        pytest.skip("this machine has an NVIDIA driver")
    assert r.returncode == 1
    assert "set MOCK_GPU=1 to run CPU instances" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- dcgm health fields and fault events
def test_the_dcgm_health_fields_are_read_where_nvml_supplies_them() -> None:
    backend = NvmlBackend(with_health_and_events(fake_pynvml()))
    s = backend.sample(backend.list_gpus())[0]
    assert s.total_energy == 123_456_789
    assert s.memory_temperature == 71.0
    assert s.pcie_replay == 7
    assert (s.ecc_sbe_volatile, s.ecc_dbe_volatile, s.ecc_sbe_aggregate, s.ecc_dbe_aggregate) == (10, 20, 11, 21)
    assert (s.remapped_rows_correctable, s.remapped_rows_uncorrectable, s.row_remap_failure) == (2, 1, 1)
    assert (s.power_violation, s.thermal_violation) == (5000.0, 10000.0)  # ns -> us
    assert s.throttle_reasons == 0x4
    assert s.processes == ((4242, 3 * 2**30),)


def test_a_health_field_the_gpu_lacks_is_omitted_and_the_rest_still_read() -> None:
    nvml = with_health_and_events(fake_pynvml(), unsupported=("energy", "ecc", "memtemp", "rows", "procs"))
    backend = NvmlBackend(nvml)
    s = backend.sample(backend.list_gpus())[1]
    assert not s.failed
    for field in ("total_energy", "ecc_sbe_volatile", "ecc_dbe_aggregate", "memory_temperature",
                  "remapped_rows_correctable", "row_remap_failure", "processes"):
        assert getattr(s, field) is None, field
        assert field not in s.to_dict()
    assert s.pcie_replay == 7
    # an nvidia-ml-py too old to have a call: omitted the same way
    del nvml.nvmlDeviceGetPcieReplayCounter
    assert backend.sample(backend.list_gpus())[1].pcie_replay is None


def test_the_nvml_listener_registers_xid_and_ecc_and_maps_events_to_gpus() -> None:
    nvml = with_health_and_events(fake_pynvml())
    backend = NvmlBackend(nvml)
    gpus = backend.list_gpus()
    listener = open_listener(backend, gpus)
    assert isinstance(listener, NvmlEventListener)
    got: list[GpuEvent] = []
    seen = threading.Event()

    def on_event(e: GpuEvent) -> None:
        got.append(e)
        if len(got) == 3:
            seen.set()

    assert listener.start(on_event) == {0: "", 1: ""}
    assert nvml.registered == {"GPU-aaaa": 0xB, "GPU-bbbb": 0xB}  # Xid | single- | double-bit ECC
    bbbb = {"uuid": "GPU-bbbb"}
    nvml.pending += [
        types.SimpleNamespace(device=bbbb, eventType=XID_CRITICAL, eventData=79),
        types.SimpleNamespace(device=bbbb, eventType=DOUBLE_BIT_ECC, eventData=0),
        types.SimpleNamespace(device={"uuid": "GPU-gone"}, eventType=XID_CRITICAL, eventData=13),
    ]
    assert seen.wait(30)
    assert [(e.kind, e.index, e.xid) for e in got] == [
        (EventKind.XID, 1, 79), (EventKind.ECC_DOUBLE, 1, 0), (EventKind.XID, None, 13)
    ]
    listener.stop(timeout=10)
    assert nvml.freed  # the event set is released when the thread ends


def test_a_gpu_without_xid_events_is_reported_and_the_others_still_listened_to() -> None:
    nvml = with_health_and_events(fake_pynvml(), no_xid="GPU-aaaa")
    backend = NvmlBackend(nvml)
    listener = open_listener(backend, backend.list_gpus())
    assert listener is not None
    result = listener.start(lambda e: None)
    assert result[0] == "this GPU does not report Xid events"
    assert result[1] == ""
    listener.stop(timeout=10)


def test_the_mock_backend_emits_pushed_events_to_its_listener() -> None:
    backend = MockBackend(2, 2**30)
    listener = open_listener(backend, backend.list_gpus())
    assert listener is not None
    got: list[GpuEvent] = []
    assert listener.start(got.append) == {0: "", 1: ""}
    backend.push_event(1, 79)
    backend.push_event(0, kind=EventKind.ECC_SINGLE)
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    listener.stop(timeout=10)
    assert [(e.kind, e.index, e.xid) for e in got] == [(EventKind.XID, 1, 79), (EventKind.ECC_SINGLE, 0, 0)]


def test_the_mock_events_file_feeds_the_listener_and_a_bad_line_is_skipped(tmp_path: Path) -> None:
    events = tmp_path / "mock_gpu_events.jsonl"
    events.write_text('{"gpu": 0, "xid": 31}\n')  # written before listening: old news
    backend = MockBackend(2, 2**30, events)
    listener = open_listener(backend, backend.list_gpus())
    assert listener is not None
    got: list[GpuEvent] = []
    listener.start(got.append)
    with events.open("a") as fh:
        fh.write('not json\n{"gpu": 1, "xid": 79}\n{"kind": "ecc_double", "gpu": 0}\n{"gpu": null, "xid"')
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    listener.stop(timeout=10)
    assert [(e.kind, e.index, e.xid) for e in got] == [(EventKind.XID, 1, 79), (EventKind.ECC_DOUBLE, 0, 0)]
