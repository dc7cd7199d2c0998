"""What ComfyUI sends, parsed: /ws events, /history entries, /queue listings, POST /prompt
refusals, and the /ws greeting of either dialect. Pure: no I/O here (``client`` does the calls).

Dialects (``../shared/COMFYUI_API.md``): upstream ComfyUI honours ``/ws?clientId=X`` and greets
with ``status`` carrying ``sid: X``; the fleet's fork (stakeordie/ComfyUI master) assigns its own
id and sends ``{"type": "client_id", "data": {"client_id": ...}}`` first, and adds
``node_executing`` per node.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

from orchestrator.core.workflow import Workflow, first_node_error, format_node_errors

FailureType = Literal["validation", "execution", "interrupted"]
EventKind = Literal["started", "done", "error", "interrupted", "other"]
Dialect = Literal["upstream", "fork", ""]
QueuePosition = Literal["running", "pending", "missing"]

_NODE_ID_IN_DETAILS = re.compile(r"#([^'\s]+)'")
_STARTED_EVENTS = frozenset(
    {"execution_start", "execution_cached", "progress", "executed", "progress_state", "node_executing"}
)


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a prompt failed or was refused, naming the node (and input) when ComfyUI does."""

    type: FailureType
    message: str
    node_id: str | None = None
    node_type: str | None = None
    field: str | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """What one /ws message (or a /history entry) means for our prompt."""

    kind: EventKind
    error: Failure | None = None


@dataclasses.dataclass(frozen=True)
class OutputRef:
    """One file a node reported in /history (``GET /view`` serves it)."""

    node_id: str
    filename: str
    subfolder: str = ""
    type: str = "output"


# ---------------------------------------------------------------- /ws events
def classify_event(message: Mapping[str, Any], prompt_id: str | None) -> Event:
    """Map a ComfyUI /ws JSON message onto our prompt's progress.

    ``executing`` with ``node: null`` or ``execution_success`` = done; ``execution_error`` =
    failed; ``execution_interrupted``; anything else that names our prompt = it has started.
    """
    kind = message.get("type")
    data = message.get("data")
    if not isinstance(data, dict):
        return Event("other")
    pid = data.get("prompt_id")
    if pid is not None and prompt_id is not None and pid != prompt_id:
        return Event("other")
    if kind == "executing":
        if data.get("node") is None:
            return Event("done") if pid is not None or prompt_id is not None else Event("other")
        return Event("started")
    if kind == "execution_success":
        return Event("done")
    if kind == "execution_error":
        return Event("error", _execution_error(data))
    if kind == "execution_interrupted":
        node = data.get("node_id")
        return Event(
            "interrupted",
            Failure(
                type="interrupted",
                message="the execution was interrupted" + (f" at node {node}" if node else ""),
                node_id=None if node is None else str(node),
                node_type=data.get("node_type"),
            ),
        )
    if kind in _STARTED_EVENTS and pid:
        return Event("started")
    return Event("other")


@dataclasses.dataclass(frozen=True)
class NodeTiming:
    """One node of a finished prompt: how long it executed (0 when served from cache)."""

    id: str
    class_type: str
    seconds: float
    cached: bool


@dataclasses.dataclass
class NodeProgress:
    """Which of a prompt's nodes are done, and how long each took, from the server's events.

    Upstream: ``execution_cached`` (nodes), ``executing`` (a node starts, so the one before it
    is done), ``executed``, ``progress_state`` (``finished`` nodes). The fork adds
    ``node_executing`` per node. Counting by node id makes duplicates harmless.

    Timings (when ``update`` is given ``now``): a node runs from its ``executing`` to the next
    node's ``executing``, its own ``executed``, or the prompt's end (success, error,
    interruption, ``executing`` null). ``class_types`` (node id -> class) comes from the
    workflow; the fork's ``node_executing`` names the class too.
    """

    total: int
    done_nodes: set[str] = dataclasses.field(default_factory=set)
    current: str | None = None
    completed: bool = False
    class_types: dict[str, str] = dataclasses.field(default_factory=dict)
    cached_nodes: list[str] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    order: list[str] = dataclasses.field(default_factory=list)
    since: float | None = None  # when ``current`` started (None: not timed, or already closed)

    @property
    def done(self) -> int:
        return self.total if self.completed else min(self.total, len(self.done_nodes))

    def update(self, message: Mapping[str, Any], prompt_id: str | None, now: float | None = None) -> None:
        """Apply one /ws message (messages of other prompts are ignored); ``now``: monotonic seconds."""
        kind = message.get("type")
        data = message.get("data")
        if not isinstance(data, dict):
            return
        pid = data.get("prompt_id")
        if prompt_id is None or (pid is not None and pid != prompt_id):
            return
        if kind == "execution_cached" and pid is not None:
            for n in data.get("nodes") or []:
                if n is not None and str(n) not in self.cached_nodes:
                    self.cached_nodes.append(str(n))
                    self.done_nodes.add(str(n))
        elif kind in {"executing", "node_executing"} and pid is not None:
            node = data.get("node")
            if node is None:
                self.finish(now)
                return
            node = str(node)
            if isinstance(data.get("class_type"), str):
                self.class_types.setdefault(node, data["class_type"])
            if self.current != node:
                if self.current is not None:
                    self.done_nodes.add(self.current)
                    self._close(now)
                self.current = node
                self.since = now
                if node not in self.order:
                    self.order.append(node)
        elif kind == "executed" and data.get("node") is not None:
            node = str(data["node"])
            self.done_nodes.add(node)
            if node == self.current:
                self._close(now)
        elif kind == "progress_state" and isinstance(data.get("nodes"), dict):
            for node_id, state in data["nodes"].items():
                if isinstance(state, dict) and state.get("state") == "finished":
                    self.done_nodes.add(str(node_id))
        elif kind in {"execution_success", "execution_error", "execution_interrupted"}:
            self._close(now)

    def _close(self, now: float | None) -> None:
        """The current node ended at ``now``: record its time (once)."""
        if self.current is not None and self.since is not None and now is not None:
            self.seconds.setdefault(self.current, max(0.0, now - self.since))
        self.since = None

    def finish(self, now: float | None = None) -> None:
        """The prompt completed: every node counts as done."""
        self._close(now)
        if self.current is not None:
            self.done_nodes.add(self.current)
        self.current = None
        self.completed = True

    def timings(self) -> list[NodeTiming]:
        """The cached nodes, then the executed ones in the order they ran (those with a time)."""
        out = [NodeTiming(n, self.class_types.get(n, ""), 0.0, True) for n in self.cached_nodes]
        out.extend(
            NodeTiming(n, self.class_types.get(n, ""), self.seconds[n], False)
            for n in self.order
            if n in self.seconds and n not in self.cached_nodes
        )
        return out


def node_classes(workflow: Workflow) -> dict[str, str]:
    """Node id -> class_type of an API-format workflow."""
    return {str(k): str(v.get("class_type", "")) for k, v in workflow.items() if isinstance(v, dict)}


def greeting(message: Any, client_id: str) -> tuple[str, Dialect] | None:
    """The id our events go to and the dialect, from one greeting message; None: not a greeting.

    Upstream sends ``status`` with our own ``sid``; the fork sends ``client_id`` with its own
    id first (then ``status``, whose ``sid`` is that id too).
    """
    data = message.get("data") if isinstance(message, dict) else None
    if not isinstance(data, dict):
        return None
    if message.get("type") == "client_id" and isinstance(data.get("client_id"), str):
        return str(data["client_id"]), "fork"
    if message.get("type") == "status":
        sid = data.get("sid")
        if isinstance(sid, str) and sid and sid != client_id:
            return sid, "fork"
        return client_id, "upstream"
    return None


def _execution_error(data: Mapping[str, Any]) -> Failure:
    node = data.get("node_id")
    node_type = data.get("node_type")
    exc_type = data.get("exception_type") or "error"
    exc_msg = str(data.get("exception_message") or "").strip() or "no message"
    where = f"node {node} ({node_type})" if node is not None else "the workflow"
    return Failure(
        type="execution",
        message=f"{where} failed: {exc_type}: {exc_msg}",
        node_id=None if node is None else str(node),
        node_type=node_type,
    )


# ---------------------------------------------------------------- /history and /queue
def history_entry(body: Any, prompt_id: str) -> dict[str, Any] | None:
    """The prompt's entry in a ``GET /history/{id}`` answer; None while it has not ended."""
    entry = body.get(prompt_id) if isinstance(body, dict) else None
    return entry if isinstance(entry, dict) else None


def history_outcome(entry: Mapping[str, Any]) -> Event:
    """What a finished ``/history/{id}`` entry says: done, error (with node) or interrupted."""
    status = entry.get("status") or {}
    messages = status.get("messages") or [] if isinstance(status, dict) else []
    for item in messages:
        if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict):
            name, data = item
            if name == "execution_error":
                return Event("error", _execution_error(data))
            if name == "execution_interrupted":
                return classify_event({"type": name, "data": data}, None)
    if isinstance(status, dict) and status.get("status_str") == "error":
        return Event("error", Failure(type="execution", message="the instance reports the prompt failed"))
    return Event("done")


def history_times(entry: Mapping[str, Any]) -> float | None:
    """Execution seconds from the history's message timestamps (milliseconds), if present."""
    status = entry.get("status") or {}
    start = end = None
    for item in (status.get("messages") or []) if isinstance(status, dict) else []:
        if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict):
            ts = item[1].get("timestamp")
            if not isinstance(ts, int | float):
                continue
            if item[0] == "execution_start":
                start = ts
            elif item[0] in {"execution_success", "execution_error", "execution_interrupted"}:
                end = ts
    if start is None or end is None or end < start:
        return None
    return (end - start) / 1000.0


def history_outputs(entry: Mapping[str, Any]) -> list[OutputRef]:
    """Every file a node reported (images, gifs, videos, audio…), in node order."""
    files: list[OutputRef] = []
    outputs = entry.get("outputs") or {}
    if not isinstance(outputs, dict):
        return files
    for node_id in sorted(outputs, key=lambda n: (0, int(n), "") if str(n).isdigit() else (1, 0, str(n))):
        node_out = outputs[node_id]
        if not isinstance(node_out, dict):
            continue
        for items in node_out.values():
            if not isinstance(items, list):
                continue
            files.extend(
                OutputRef(
                    node_id=str(node_id),
                    filename=item["filename"],
                    subfolder=str(item.get("subfolder") or ""),
                    type=str(item.get("type") or "output"),
                )
                for item in items
                if isinstance(item, dict) and isinstance(item.get("filename"), str)
            )
    return files


def queue_position(body: Any, prompt_id: str) -> QueuePosition:
    """Where a ``GET /queue`` answer has the prompt: running, pending or missing."""
    for key, where in (("queue_running", "running"), ("queue_pending", "pending")):
        for item in body.get(key, []) if isinstance(body, dict) else []:
            if isinstance(item, list) and len(item) > 1 and item[1] == prompt_id:
                return "running" if where == "running" else "pending"
    return "missing"


def queue_lengths(body: Any) -> tuple[int | None, int | None]:
    """(pending, running) from a ``GET /queue`` answer; None where the list is missing."""
    counts: list[int | None] = []
    for key in ("queue_pending", "queue_running"):
        value = body.get(key) if isinstance(body, dict) else None
        counts.append(len(value) if isinstance(value, list) else None)
    return counts[0], counts[1]


# ---------------------------------------------------------------- POST /prompt
def prompt_rejection(body: Any, workflow: Workflow) -> Failure:
    """A 400 (or ``node_errors``) from POST /prompt as one line naming the node and input."""
    if not isinstance(body, dict):
        return Failure(type="validation", message="the instance refused the workflow")
    node_errors = body.get("node_errors") or {}
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    node_id, field = first_node_error(node_errors) if isinstance(node_errors, dict) else (None, None)
    message = format_node_errors(node_errors, workflow) if isinstance(node_errors, dict) else ""
    if not message:
        message = str(error.get("message") or "the instance refused the workflow")
        details = error.get("details")
        if details:
            message += f" ({details})"
            match = _NODE_ID_IN_DETAILS.search(str(details))
            if match and node_id is None:
                node_id = match.group(1)
    node_type = workflow.get(node_id, {}).get("class_type") if node_id else None
    return Failure(type="validation", message=message, node_id=node_id, node_type=node_type, field=field)
