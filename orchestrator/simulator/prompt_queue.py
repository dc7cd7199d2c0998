"""The prompt queue and the history: pending prompts ordered by number, one running, like ComfyUI."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


@dataclasses.dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    sensitive: dict[str, Any] = dataclasses.field(default_factory=dict)

    def public(self) -> list[Any]:
        """The item as /queue and /history show it (sensitive extra data removed)."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    """Pending prompts ordered by number, the running one, and the history (in memory only)."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self.pending: list[QueueItem] = []
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}
        self._number = 0
        self._task_counter = 0
        self._wakeup = asyncio.Event()

    def next_number(self, front: bool = False) -> int:
        number = self._number
        self._number += 1
        return -number if front else number

    def put(self, item: QueueItem) -> None:
        index = len(self.pending)
        while index > 0 and self.pending[index - 1].number > item.number:
            index -= 1
        self.pending.insert(index, item)
        self._wakeup.set()
        self._on_change()

    async def get(self) -> tuple[int, QueueItem]:
        while not self.pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self.pending.pop(0)
        self._task_counter += 1
        self.running[self._task_counter] = item
        self._on_change()
        return self._task_counter, item

    def task_done(self, task_id: int, entry: dict[str, Any]) -> None:
        item = self.running.pop(task_id)
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        self.history[item.prompt_id] = entry
        self._on_change()

    def remaining(self) -> int:
        return len(self.pending) + len(self.running)

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def wipe_queue(self) -> None:
        self.pending.clear()
        self._on_change()

    def delete_queued(self, prompt_id: str) -> bool:
        for i, item in enumerate(self.pending):
            if item.prompt_id == prompt_id:
                del self.pending[i]
                self._on_change()
                return True
        return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        if prompt_id is not None:
            return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out: dict[str, Any] = {}
        for i, (key, value) in enumerate(self.history.items()):
            if i >= offset:
                out[key] = value
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def wipe_history(self) -> None:
        self.history.clear()

    def delete_history(self, prompt_id: str) -> None:
        self.history.pop(prompt_id, None)

    def set_flag(self, name: str, value: Any) -> None:
        self.flags[name] = value

    def take_flags(self) -> dict[str, Any]:
        flags, self.flags = self.flags, {}
        return flags

