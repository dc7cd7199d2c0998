"""GPU telemetry and instance memory, each sampled in a thread of its own, so that no reader ever
waits on NVML or on /proc."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from orchestrator.core.errors import GpuError
from orchestrator.core.gpus import Gpu, GpuSample
from orchestrator.core.readiness import GpuStatus
from orchestrator.machine.gpu import GpuBackend

log = logging.getLogger(__name__)


class SamplerThread:
    """A daemon thread running ``_run`` (each sampler's rounds, until ``_stop`` is set)."""

    thread_name = "sampler"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _wanted(self) -> bool:
        return True

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is None and self._wanted():
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


class GpuSampler(SamplerThread):
    """Samples GPU telemetry in a thread on its own interval; :meth:`statuses` never blocks on NVML.

    Args:
        backend_factory: opens the telemetry backend (again after a failed round).
        gpus: the GPUs to sample.
        interval: seconds between rounds.
        wall: epoch seconds (when each sample was taken).
    """

    def __init__(
        self,
        backend_factory: Callable[[], GpuBackend],
        gpus: Sequence[Gpu],
        interval: float,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._factory = backend_factory
        self._gpus = list(gpus)
        self._interval = interval
        self._wall = wall
        super().__init__()
        self._latest: dict[int, tuple[GpuSample, float]] = {}
        self._backend: GpuBackend | None = None
        self._error = ""

    thread_name = "gpu-sampler"

    def _wanted(self) -> bool:
        return bool(self._gpus)

    def sample_once(self) -> None:
        """One sampling round (the thread's body; tests call it directly)."""
        try:
            if self._backend is None:
                self._backend = self._factory()
            samples = self._backend.sample(self._gpus)
        except (GpuError, OSError) as exc:
            if str(exc) != self._error:
                log.warning("GPU telemetry unavailable: %s", exc)
            self._error = str(exc)
            self._backend = None
            return
        self._error = ""
        now = self._wall()
        # One dict assignment: readers see the previous round or this one, never a mix.
        self._latest = {s.index: (s, now) for s in samples}

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample_once()
                self._stop.wait(self._interval)
        finally:
            if self._backend is not None:
                with contextlib.suppress(GpuError, OSError):
                    self._backend.close()

    def processes(self, index: int) -> tuple[tuple[int, int], ...] | None:
        """The (pid, GPU memory bytes) NVML listed on GPU ``index`` in the latest sample (None: unknown)."""
        sample, _ = self._latest.get(index, (None, None))
        return None if sample is None else sample.processes

    def statuses(self) -> list[GpuStatus]:
        """The latest sample of every GPU (``sample`` None until its first good read)."""
        latest = self._latest
        out = []
        for gpu in self._gpus:
            sample, at = latest.get(gpu.index, (None, None))
            out.append(GpuStatus(gpu=gpu, sample=sample, sampled_at=at))
        return out


# ---------------------------------------------------------------- instance memory
EXECUTED = b"Prompt executed in "  # ComfyUI (and the simulator) log this once per prompt run


@dataclasses.dataclass(frozen=True)
class InstanceMemory:
    """One instance's memory as last sampled (bytes); ``vram`` None when NVML does not say."""

    gpu: int
    pid: int
    rss: int  # resident memory of the process and its children
    rss_at_start: int  # the first sample of this process
    vram: int | None
    jobs: int  # prompts this process ran (its "Prompt executed" log lines)
    sampled_at: float


def children_map(proc_root: Path = Path("/proc")) -> dict[int, list[int]]:
    """Every process's children, from one pass over /proc (shared by all instances of a round).

    Reads ``/proc/<pid>/stat`` directly: three times faster than ``psutil.process_iter`` and
    than one ``Process.children()`` per instance, each of which scans all of /proc again.
    """
    kids: dict[int, list[int]] = {}
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        try:
            stat = (proc_root / name / "stat").read_bytes()
            ppid = int(stat.rsplit(b")", 1)[1].split()[1])  # the command may hold spaces and ')'
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(pid: int, kids: Mapping[int, list[int]] | None = None) -> list[psutil.Process]:
    """The process and its descendants (empty when it is gone)."""
    kids = children_map() if kids is None else kids
    try:
        out = [psutil.Process(pid)]
    except psutil.Error:
        return []
    todo = list(kids.get(pid, ()))
    while todo:
        child = todo.pop()
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(child))
        todo.extend(kids.get(child, ()))
    return out


def tree_rss(procs: Sequence[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class ExecutionCounter:
    """Counts the ``Prompt executed`` lines appended to a log since the last reset (from its end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._ident: tuple[int, int] | None = None
        self._tail = b""

    def reset(self) -> None:
        """Count from the log's current end (a new process)."""
        try:
            st = self.path.stat()
        except OSError:
            self._pos, self._ident = 0, None
            return
        self._pos, self._ident, self._tail = st.st_size, (st.st_dev, st.st_ino), b""

    def new(self, max_read: int = 1 << 20) -> int:
        """Prompts executed since the previous call."""
        try:
            with self.path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                if (st.st_dev, st.st_ino) != self._ident or st.st_size < self._pos:
                    self._pos, self._ident, self._tail = 0, (st.st_dev, st.st_ino), b""  # rotated
                fh.seek(max(self._pos, st.st_size - max_read))
                data = fh.read(st.st_size - self._pos)
        except OSError:
            return 0
        self._pos += len(data)
        data = self._tail + data
        self._tail = data[-len(EXECUTED):]
        return data.count(EXECUTED)


class MemorySampler(SamplerThread):
    """Samples each instance's RSS (process tree), GPU memory and prompt count in a thread.

    Args:
        pids: the running instance process by GPU index (read from the monitor's last poll).
        log_files: each instance's log by GPU index (for the prompt count).
        gpu_processes: per GPU index, the (pid, bytes) NVML lists, None when it cannot list them.
        interval: seconds between rounds; on_process: called with (GPU index, pid) for each new
            process (the cgroup placement).
    """

    def __init__(
        self,
        pids: Callable[[], Mapping[int, int]],
        log_files: Mapping[int, Path],
        gpu_processes: Callable[[int], tuple[tuple[int, int], ...] | None],
        interval: float,
        wall: Callable[[], float] = time.time,
        on_process: Callable[[int, int], None] = lambda _gpu, _pid: None,
    ) -> None:
        self._pids = pids
        self._counters = {gpu: ExecutionCounter(path) for gpu, path in log_files.items()}
        self._gpu_processes = gpu_processes
        self._interval = interval
        self._wall = wall
        self._on_process = on_process
        self._latest: dict[int, InstanceMemory] = {}
        super().__init__()

    thread_name = "memory-sampler"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except (OSError, psutil.Error) as exc:
                log.warning("memory sampling failed: %s", exc)
            self._stop.wait(self._interval)

    def sample_once(self) -> None:
        """One round (the thread's body; tests call it directly)."""
        latest = dict(self._latest)
        pids = self._pids()
        kids = children_map() if pids else {}
        for gpu in [g for g in latest if g not in pids]:
            del latest[gpu]  # stopped: no process, no series
        for gpu, pid in pids.items():
            old = latest.get(gpu)
            counter = self._counters.get(gpu)
            if old is None or old.pid != pid:
                if counter is not None:
                    counter.reset()
                self._on_process(gpu, pid)
            procs = tree(pid, kids)
            if not procs:
                latest.pop(gpu, None)
                continue
            rss = tree_rss(procs)
            members = {p.pid for p in procs}
            listed = self._gpu_processes(gpu)
            vram = None if listed is None else sum(b for p, b in listed if p in members)
            ran = counter.new() if counter is not None else 0
            if old is None or old.pid != pid:
                latest[gpu] = InstanceMemory(gpu, pid, rss, rss, vram, ran, self._wall())
            else:
                latest[gpu] = dataclasses.replace(old, rss=rss, vram=vram, jobs=old.jobs + ran, sampled_at=self._wall())
        self._latest = latest  # one assignment: readers see a whole round

    def latest(self) -> dict[int, InstanceMemory]:
        return self._latest
