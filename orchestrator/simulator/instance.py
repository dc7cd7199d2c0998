"""One running simulator: its flags, folders, faults, prompt queue, executor and /ws hub, and the
logic POST /prompt shares with the fork's WebSocket ``prompt`` message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from orchestrator.simulator import faults as faultlib
from orchestrator.simulator import folders as fp
from orchestrator.simulator.executor import Executor
from orchestrator.simulator.faultwatch import FaultWatcher
from orchestrator.simulator.graph import validate
from orchestrator.simulator.hub import Hub
from orchestrator.simulator.nodedefs import NodeDef
from orchestrator.simulator.prompt_queue import SENSITIVE_EXTRA_DATA_KEYS, PromptQueue, QueueItem


class StopSignal(Protocol):
    """Where SIGINT lands (``server.Stopper``)."""

    @property
    def requested(self) -> bool: ...


class Simulator:
    """All state of one running simulator: flags, folders, faults, queue, sockets.

    Args:
        protocol: "upstream" or "fork": whose /ws dialect to speak (see ``hub.py``).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        folders: fp.Folders,
        env_faults: faultlib.Faults,
        defs: Mapping[str, NodeDef],
        log: Callable[[str], None],
        stopper: StopSignal,
        version: str,
        protocol: str = "upstream",
    ) -> None:
        self.args = args
        self.protocol = protocol
        self.folders = folders
        self.defs = defs
        self.log = log
        self.stopper = stopper
        self.version = version
        self.ready_at: float | None = None
        self.stop = asyncio.Event()
        self.leaked: list[bytes] = []  # the leak_per_prompt fault's allocations
        self.watch = FaultWatcher(
            env_faults,
            folders.user / faultlib.FAULTS_FILE,
            folders.comfy_dir,
            log,
            lambda: stopper.requested,
            self.since_ready,
        )
        self.hub = Hub(protocol, self, log)
        self.queue = PromptQueue(self._queue_updated)
        self.executor = Executor(folders, defs, self.hub.send, log, lambda: self.faults.gpu_vram)
        self.executor.node_progress = protocol == "fork"
        self.free_requests: list[dict[str, Any]] = []
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def faults(self) -> faultlib.Faults:
        """The faults in force now."""
        return self.watch.faults

    def since_ready(self) -> float:
        return 0.0 if self.ready_at is None else time.monotonic() - self.ready_at

    def start_tasks(self) -> None:
        """The background tasks of a listening server: the /ws publisher, the worker, the fault loop."""
        self.ready_at = time.monotonic()
        self.tasks = [
            asyncio.create_task(c) for c in (self.hub.publisher(), self.worker(), self.watch.run(self.stop))
        ]
        for task in self.tasks:
            task.add_done_callback(self.task_died)

    def task_died(self, task: asyncio.Task[None]) -> None:
        """A background task must never end while serving: die loudly, like a crashed ComfyUI."""
        if task.cancelled() or self.stop.is_set():
            return
        exc = task.exception()
        text = "".join(traceback.format_exception(exc)) if exc else f"task {task.get_name()} ended\n"
        self.log("simulator internal error:\n" + text.rstrip())
        os._exit(1)

    # ---- what the /ws hub asks ------------------------------------------------------------
    def queue_info(self) -> dict[str, Any]:
        return self.queue.queue_info()

    def running_node(self, sid: str) -> str | None:
        return self.executor.last_node_id if self.executor.client_id == sid else None

    def server_features(self) -> dict[str, Any]:
        return {
            "supports_preview_metadata": True,
            "max_upload_size": int(self.args.max_upload_size * 1024 * 1024),
        }

    def _queue_updated(self) -> None:
        self.hub.send("status", {"status": self.queue.queue_info()}, None)

    # ---- prompts ------------------------------------------------------------------------
    def queue_prompt(self, body: Any) -> tuple[int, dict[str, Any]]:
        """POST /prompt's logic, shared with the fork's WebSocket ``prompt`` message."""
        self.log("got prompt")
        if not isinstance(body, Mapping):
            body = {}
        if "number" in body:
            try:
                number: float = float(body["number"])
            except (TypeError, ValueError, OverflowError):
                number = self.queue.next_number()
        else:
            number = self.queue.next_number(bool(body.get("front")))
        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return 400, {"error": error, "node_errors": {}}
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        partial = body.get("partial_execution_targets")
        result = validate(
            prompt,
            self.defs,
            partial if isinstance(partial, list) else None,
            fp.list_input_images(self.folders.input),
        )
        extra_data = dict(body["extra_data"]) if isinstance(body.get("extra_data"), Mapping) else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not result.ok:
            self.log(f"invalid prompt: {result.error}")
            for node_id, err in result.node_errors.items():
                self.log(f"* {err['class_type']} {node_id}:")
                for reason in err["errors"]:
                    self.log(f"  - {reason['message']}: {reason['details']}")
            return 400, {"error": result.error, "node_errors": result.node_errors}
        sensitive = {k: extra_data.pop(k) for k in SENSITIVE_EXTRA_DATA_KEYS if k in extra_data}
        extra_data["create_time"] = int(time.time() * 1000)
        self.queue.put(QueueItem(number, prompt_id, dict(prompt), extra_data, result.outputs, sensitive))
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}

    async def worker(self) -> None:
        while True:
            task_id, item = await self.queue.get()
            started = time.perf_counter()
            faults = self.faults
            entry = await self.executor.execute(item, faults.exec_time / faults.speed, faults.model_load_seconds)
            self.queue.task_done(task_id, {"prompt": item.public(), **entry})
            client = item.extra_data.get("client_id")
            if isinstance(client, str):
                self.hub.send("executing", {"node": None, "prompt_id": item.prompt_id}, client)
            self.log(f"Prompt executed in {time.perf_counter() - started:.2f} seconds")
            if self.faults.leak_per_prompt:
                self.leaked.append(b"\x01" * self.faults.leak_per_prompt)  # written: it counts in RSS
            self.apply_free_flags()

    def apply_free_flags(self) -> None:
        flags = self.queue.take_flags()
        if flags.get("unload_models", flags.get("free_memory", False)):
            self.executor.unload_models()

    def request_free(self, unload: bool, free_memory: bool) -> None:
        """POST /free: unload models now, or after the running prompt."""
        self.free_requests.append({"unload_models": unload, "free_memory": free_memory})
        self.log(f"Free request: unload_models={unload} free_memory={free_memory}")
        if unload:
            self.queue.set_flag("unload_models", unload)
        if free_memory:
            self.queue.set_flag("free_memory", free_memory)
        if not self.queue.running:
            self.apply_free_flags()
