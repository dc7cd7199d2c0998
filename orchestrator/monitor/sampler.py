"""GPU telemetry sampled in a thread of its own, so that no reader ever waits on NVML."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from orchestrator.core.errors import GpuError
from orchestrator.core.gpus import Gpu, GpuSample
from orchestrator.core.readiness import GpuStatus
from orchestrator.machine.gpu import GpuBackend

log = logging.getLogger(__name__)


class GpuSampler:
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latest: dict[int, tuple[GpuSample, float]] = {}
        self._backend: GpuBackend | None = None
        self._error = ""

    def start(self) -> None:
        if self._thread is None and self._gpus:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

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

    def statuses(self) -> list[GpuStatus]:
        """The latest sample of every GPU (``sample`` None until its first good read)."""
        latest = self._latest
        out = []
        for gpu in self._gpus:
            sample, at = latest.get(gpu.index, (None, None))
            out.append(GpuStatus(gpu=gpu, sample=sample, sampled_at=at))
        return out
