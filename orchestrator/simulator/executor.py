"""The graph runner: one prompt at a time, like ComfyUI, with its events, history entry and cache.

What each node does when it runs is in ``behaviours.py``; the queue it takes prompts from is in
``prompt_queue.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from orchestrator.machine.fs import atomic_write
from orchestrator.simulator import behaviours as nb
from orchestrator.simulator import folders as fp
from orchestrator.simulator.failures import Interrupted, NodeFailure, format_exception
from orchestrator.simulator.graph import execution_order, is_link, node_inputs, signatures
from orchestrator.simulator.nodedefs import NodeDef
from orchestrator.simulator.prompt_queue import QueueItem


class Send(Protocol):
    def __call__(self, event: str, data: Mapping[str, Any], sid: str | None) -> None: ...


def _umask() -> int:
    """This process's umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Like ComfyUI (PIL's open()), outputs get 0666 less the umask supervisord set (UMASK).
_FILE_MODE = 0o666 & ~_umask()


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, data, mode=_FILE_MODE)


def _state(node_id: str, pid: str, state: str, value: int, maximum: int) -> dict[str, Any]:
    """One node's entry in a ``progress_state`` message."""
    return {
        "value": value,
        "max": maximum,
        "state": state,
        "node_id": node_id,
        "prompt_id": pid,
        "display_node_id": node_id,
        "parent_node_id": None,
        "real_node_id": node_id,
    }


@dataclasses.dataclass
class _Run:
    """What one prompt's execution has produced so far."""

    item: QueueItem
    to_run: int  # nodes not served from the cache
    unit_time: float  # seconds of simulated work per unit (see behaviours.units)
    load_time: float = 0.0  # extra seconds a model loader node takes when it runs
    messages: list[list[Any]] = dataclasses.field(default_factory=list)
    results: dict[str, nb.NodeResult] = dataclasses.field(default_factory=dict)
    fresh: dict[str, nb.NodeResult] = dataclasses.field(default_factory=dict)  # by signature
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    executed: list[str] = dataclasses.field(default_factory=list)
    states: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def pid(self) -> str:
        return self.item.prompt_id


class Executor:
    """Runs one prompt: events over ``send``, outputs on disk, node results cached by signature."""

    def __init__(
        self,
        folders: fp.Folders,
        defs: Mapping[str, NodeDef],
        send: Send,
        log: Callable[[str], None],
        vram_total: Callable[[], int],
        write_file: Callable[[Path, bytes], None] | None = None,
    ) -> None:
        self.folders = folders
        self.defs = defs
        self.send = send
        self.log = log
        self.vram_total = vram_total
        self.images = nb.ImageWriter(folders, write_file or _write)
        self.cache: dict[str, nb.NodeResult] = {}
        self.interrupted = False
        self.prompt_id: str | None = None  # the prompt executing now
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.node_progress = False  # the fork's per-node node_executing messages (SIM_PROTOCOL=fork)
        self.loaded: dict[str, int] = {}  # model signature -> simulated VRAM bytes
        self._png_text: dict[str, str] = {}
        self._wake = asyncio.Event()

    def interrupt(self) -> None:
        self.interrupted = True
        self._wake.set()

    async def _work(self, seconds: float) -> None:
        """Simulated work: ``seconds`` of sleep that an interrupt cuts short."""
        if seconds > 0 and not self.interrupted:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._check_interrupt()

    def unload_models(self) -> None:
        self.loaded.clear()

    def loaded_bytes(self) -> int:
        return sum(self.loaded.values())

    def _check_interrupt(self) -> None:
        if self.interrupted:
            raise Interrupted()

    async def execute(self, item: QueueItem, exec_time: float, model_load: float = 0.0) -> dict[str, Any]:
        """Run ``item``; return its history entry (without ``prompt``).

        ``exec_time`` seconds are shared by the nodes that run; each model loader node that runs
        (its result not cached) takes ``model_load`` seconds more.
        """
        pid = item.prompt_id
        prompt = item.prompt
        client = item.extra_data.get("client_id")
        self.client_id = client if isinstance(client, str) else None
        self.prompt_id = pid
        self.interrupted = False
        self._wake.clear()
        self._png_text = nb.png_metadata(prompt, item.extra_data)
        run = _Run(item, 0, 0.0, max(model_load, 0.0))
        self._add(run, "execution_start", {"prompt_id": pid})
        sigs = signatures(prompt)
        self._add(run, "execution_cached", {"nodes": [n for n in prompt if sigs[n] in self.cache], "prompt_id": pid})
        order = execution_order(prompt, item.outputs)
        to_run = [n for n in order if sigs[n] not in self.cache]
        run.to_run = len(to_run)
        run.unit_time = max(exec_time, 0.0) / (sum(nb.units(prompt[n]) for n in to_run) or 1)
        success = False
        node_id = ""
        try:
            for node_id in order:
                await self._step(run, node_id, sigs[node_id])
            success = True
            self._add(run, "execution_success", {"prompt_id": pid})
        except Interrupted:
            self.log("Processing interrupted")
            failed = {"prompt_id": pid, "node_id": node_id, "node_type": prompt[node_id]["class_type"]}
            self._add(run, "execution_interrupted", {**failed, "executed": run.executed}, broadcast=True)
        except NodeFailure as failure:
            self._failed(run, node_id, failure)
        finally:
            # Like ComfyUI's classic cache: keep only what the latest prompt used.
            live = set(sigs.values())
            self.cache = {s: r for s, r in {**self.cache, **run.fresh}.items() if s in live}
            self.last_node_id = None
            self.prompt_id = None
        return {
            "outputs": run.outputs,
            "status": {"status_str": "success" if success else "error", "completed": success, "messages": run.messages},
            "meta": run.meta,
        }

    def _add(self, run: _Run, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        """A prompt-level event: kept in the history entry and sent to the prompt's client."""
        stamped = {**data, "timestamp": int(time.time() * 1000)}
        run.messages.append([event, stamped])
        if self.client_id is not None or broadcast:
            self.send(event, stamped, self.client_id)

    def _node_event(self, event: str, data: dict[str, Any]) -> None:
        if self.client_id is not None:
            self.send(event, data, self.client_id)

    async def _step(self, run: _Run, node_id: str, sig: str) -> None:
        """One node in execution order: from the cache, or run with its events."""
        pid = run.pid
        node = run.item.prompt[node_id]
        cls = self.defs[str(node["class_type"])]
        result = self.cache.get(sig)
        if result is None:
            self._check_interrupt()
            self._node_event("executing", {"node": node_id, "display_node": node_id, "prompt_id": pid})
            if self.node_progress:
                current = len(run.executed) + 1
                progress = {
                    "current": current,
                    "total": run.to_run,
                    "percentage": round(100.0 * current / max(run.to_run, 1), 1),
                }
                self._node_event(
                    "node_executing", {"node": node_id, "prompt_id": pid, "class_type": cls.name, "progress": progress}
                )
            self.last_node_id = node_id
            run.states[node_id] = _state(node_id, pid, "running", 0, 1)
            self._node_event("progress_state", {"prompt_id": pid, "nodes": dict(run.states)})
            if cls.name in nb.LOADER_BYTES:
                await self._work(run.load_time)
            result = await self._run_node(node_id, node, cls, run.results, sig, run.unit_time, pid)
            run.fresh[sig] = result
            run.executed.append(node_id)
            run.states[node_id] = _state(node_id, pid, "finished", 1, 1)
            self._node_event("progress_state", {"prompt_id": pid, "nodes": dict(run.states)})
        run.results[node_id] = result
        if result.ui:
            run.outputs[node_id] = result.ui
            run.meta[node_id] = {
                "node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id
            }
            self._node_event(
                "executed", {"node": node_id, "display_node": node_id, "output": result.ui, "prompt_id": pid}
            )

    def _failed(self, run: _Run, node_id: str, failure: NodeFailure) -> None:
        """A node raised: log it as ComfyUI does and record ``execution_error``."""
        self.log(f"!!! Exception during processing !!! {failure.message}")
        self.log(format_exception(failure))
        if failure.exception_type == "torch.OutOfMemoryError":
            self.log("")
            self.log("Got an OOM, unloading all loaded models.")
            self.unload_models()
        node = run.item.prompt[node_id]
        inputs = node_inputs(node)
        self._add(
            run,
            "execution_error",
            {
                "prompt_id": run.pid,
                "node_id": node_id,
                "node_type": node["class_type"],
                "executed": run.executed,
                "exception_message": failure.message,
                "exception_type": failure.exception_type,
                "traceback": failure.traceback,
                "current_inputs": {k: [v] for k, v in inputs.items() if not is_link(v)},
                "current_outputs": list(run.item.outputs),
            },
        )

    async def _run_node(
        self,
        node_id: str,
        node: Mapping[str, Any],
        cls: NodeDef,
        results: Mapping[str, nb.NodeResult],
        sig: str,
        unit_time: float,
        pid: str,
    ) -> nb.NodeResult:
        units = nb.units(node)
        if cls.name == "KSampler":
            steps = max(1, nb.int_input(node, "steps", 20))
            for i in range(units):
                await self._work(unit_time)
                progress = {"value": max(1, steps * (i + 1) // units), "max": steps, "prompt_id": pid, "node": node_id}
                self._node_event("progress", progress)
        else:
            await self._work(unit_time)
        failure = nb.planted_failure(node_id, node, cls, self.folders.comfy_dir, self.vram_total())
        if failure is not None:
            raise failure
        if cls.name in nb.LOADER_BYTES:
            self.loaded[sig] = nb.LOADER_BYTES[cls.name]
        dims = nb.node_dims(node, cls, results, self.folders)
        return self.images.result(node, cls, dims, sig, self._png_text)
