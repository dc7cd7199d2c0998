"""Faults while serving: re-reads the fault file and crashes, hangs or prints OOM errors when due."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.simulator import faults as faultlib
from orchestrator.simulator import startup
from orchestrator.simulator.failures import format_exception, oom_failure

FAULT_POLL_SECONDS = 0.5


class FaultWatcher:
    """The faults in force (environment overlaid with the fault file) and the loop that acts on them.

    Args:
        env_faults: the ``SIM_*`` faults; the fault file's values overlay them.
        fault_file: ``<user directory>/simulator_faults.json``.
        comfy_dir: the code tree (the crash and OOM tracebacks name its files).
        log: the console.
        stop_requested: True once SIGINT arrived (a hang must still end then).
        since_ready: seconds since the server started listening.
    """

    def __init__(
        self,
        env_faults: faultlib.Faults,
        fault_file: Path,
        comfy_dir: Path,
        log: Callable[[str], None],
        stop_requested: Callable[[], bool],
        since_ready: Callable[[], float],
    ) -> None:
        self.env_faults = env_faults
        self.faults = env_faults
        self.fault_file = fault_file
        self.comfy_dir = comfy_dir
        self.log = log
        self.stop_requested = stop_requested
        self.since_ready = since_ready
        self._warnings: list[str] = []
        self.stamp: tuple[int, int, int] | None = None  # (inode, mtime, size) at the last read

    def reload(self) -> None:
        try:
            st = os.stat(self.fault_file)
            self.stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            self.stamp = None
        values, warnings = faultlib.read_file(self.fault_file)
        faults, more = faultlib.overlay(self.env_faults, values, str(self.fault_file))
        warnings += more
        if warnings != self._warnings:
            for w in warnings:
                self.log(w)
            self._warnings = warnings
        self.faults = faults

    def crash(self) -> None:
        self.log(
            startup.crash_text(
                self.comfy_dir,
                f"RuntimeError: simulated crash {self.since_ready():.1f} s after start (crash_after fault)",
            )
        )
        os._exit(1)

    def print_oom(self) -> None:
        failure = oom_failure(self.comfy_dir, self.faults.gpu_vram)
        self.log(f"!!! Exception during processing !!! {failure.message}")
        self.log(format_exception(failure))
        self.log("")
        self.log("Got an OOM, unloading all loaded models.")

    def hang(self) -> None:
        """Block the event loop thread: the port still accepts TCP, but nothing answers.

        Returns only when a stop signal arrives or the fault file no longer asks for a hang.
        """
        last_read = time.monotonic()
        while not self.stop_requested():
            time.sleep(0.05)
            if time.monotonic() - last_read >= FAULT_POLL_SECONDS:
                last_read = time.monotonic()
                self.reload()
                if self.faults.hang_after is None:
                    return

    async def run(self, stop: asyncio.Event) -> None:
        """Poll the fault file and act on what is due until ``stop`` is set."""
        last_read = time.monotonic()
        last_oom: float | None = None
        seen_stamp: tuple[int, int, int] | None = None
        while not stop.is_set():
            if time.monotonic() - last_read >= FAULT_POLL_SECONDS:
                last_read = time.monotonic()
                self.reload()
            if self.stamp != seen_stamp:
                # A new write of the fault file re-arms "once" faults (oom: 0), even when the
                # write that removed it in between came and went before this loop read the file.
                seen_stamp = self.stamp
                last_oom = None
            since = self.since_ready()
            due = faultlib.due(self.faults, since, last_oom)
            if due.crash:
                self.crash()
            if due.oom:
                last_oom = since
                self.print_oom()
            if due.hang:
                self.hang()
            if self.faults.oom is None:
                last_oom = None
            await asyncio.sleep(0.05)
