"""A job past its deadline: interrupted (running) or removed from the queue (waiting), reported
``timeout`` at once; its instance is reported hung only when the interrupt does not take within
JOB_INTERRUPT_GRACE, never for another client's prompt, and never through a tiny ``timeout``.

Real simulator processes (the ComfyUI stand-in) serve the prompts; the job API runs on uvicorn;
the monitor's directory is a small fake that records hung reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry
from support import ComfyServer, ServedApp, http_client, jobs_app, txt2img, wait_for

from orchestrator.comfy.client import ComfyCallError
from orchestrator.core.instances import InstanceView
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState
from orchestrator.jobs.attempt import confirm_stopped
from orchestrator.jobs.follow import Tracking
from orchestrator.jobs.store import Job
from orchestrator.jobs.tracker import JobManager


class Directory:
    """The monitor's instance directory over simulators, READY; records hung reports."""

    def __init__(self, ports: list[int]) -> None:
        self.views = {i: InstanceView(i, f"comfyui_gpu{i}", p, InstanceState.READY) for i, p in enumerate(ports)}
        self.hung: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def snapshot(self) -> list[InstanceView]:
        with self.lock:
            return list(self.views.values())

    def report_hung(self, index: int, reason: str) -> None:
        with self.lock:
            self.hung.append((index, reason))
            self.views[index] = dataclasses.replace(self.views[index], state=InstanceState.UNHEALTHY)


class Api:
    def __init__(self, ports: list[int], **env: str) -> None:
        settings = load_settings({"ROOT": "/nonexistent-root", **{k.upper(): v for k, v in env.items()}})
        self.directory = Directory(ports)
        self.manager = JobManager(settings, self.directory, CollectorRegistry(), poll_interval=0.1,
                                  check_interval=0.1)
        self.served = ServedApp(jobs_app(self.manager))
        self.client = http_client(self.served.url, timeout=60)

    def post(self, **body: Any) -> requests.Response:
        return self.client.post("/jobs", json={"workflow": txt2img("t", seed=uuid.uuid4().int % 10**9), **body})

    def close(self) -> None:
        self.client.close()
        self.served.stop()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.simulator.tree import write_code_tree

    path = tmp_path_factory.mktemp("comfy") / "ComfyUI"
    write_code_tree(path)
    return path


@pytest.fixture
def slow(tree: Path, tmp_path: Path) -> Iterator[ComfyServer]:
    """One simulator taking 30 s per prompt (a slow workflow); its exec time can be changed live."""
    sim = ComfyServer(tree, tmp_path / "gpu0", env={"SIM_EXEC_TIME": "30"})
    try:
        sim.wait_ready()
        yield sim
    finally:
        sim.stop()


def queue(sim: ComfyServer) -> dict[str, Any]:
    return dict(requests.get(f"{sim.url}/queue", timeout=5).json())


def history(sim: ComfyServer, prompt_id: str) -> dict[str, Any]:
    return dict(requests.get(f"{sim.url}/history/{prompt_id}", timeout=5).json().get(prompt_id) or {})


def events(entry: dict[str, Any]) -> list[str]:
    return [m[0] for m in entry.get("status", {}).get("messages", [])]


def test_a_job_past_its_deadline_is_interrupted_the_instance_kept_and_the_next_job_succeeds(
    slow: ComfyServer,
) -> None:
    api = Api([slow.port], job_interrupt_grace="5")
    try:
        body = api.post(gpu=0, timeout=1).json()  # the prompt takes 30 s
        assert body["status"] == "timeout", body
        assert body["error"]["type"] == "timeout"
        assert "deadline while executing; interrupted" in body["error"]["message"]
        # The interrupt took: the prompt ended as interrupted, well before its 30 s.
        entry = wait_for(lambda: history(slow, body["prompt_id"]), 10, what="the prompt in /history")
        assert "execution_interrupted" in events(entry)
        # The grace watch is over once the instance is released; it reported nothing.
        wait_for(lambda: api.manager.inflight().get(0, 0) == 0, 15, what="the grace watch to end")
        assert api.directory.hung == []
        assert api.directory.views[0].state is InstanceState.READY
        (slow.user / "simulator_faults.json").write_text(json.dumps({"exec_time": 0.2}))
        # Retried only until the simulator re-read its faults file (every 0.5 s): then 0.2 s a prompt.
        second = wait_for(lambda: (r := api.post(gpu=0, timeout=10).json())["status"] == "success" and r, 60,
                          what="a second job on the same instance to succeed")
        assert second["instance"]["gpu"] == 0
        assert second["attempts"] == 1
    finally:
        api.close()


def test_another_clients_running_prompt_is_never_interrupted_by_our_deadline(slow: ComfyServer) -> None:
    api = Api([slow.port], job_interrupt_grace="2")
    try:
        other = requests.post(f"{slow.url}/prompt", json={"prompt": txt2img("o", seed=7), "client_id": "other"},
                              timeout=5).json()["prompt_id"]
        wait_for(lambda: [p[1] for p in queue(slow)["queue_running"]] == [other], 10, what="the other prompt running")
        body = api.post(gpu=0, timeout=1).json()  # queued behind the other client's 30 s prompt
        assert body["status"] == "timeout", body
        assert "while still queued; removed from the queue" in body["error"]["message"]
        q = queue(slow)
        assert [p[1] for p in q["queue_running"]] == [other]  # still running, not interrupted
        assert q["queue_pending"] == []
        assert api.directory.hung == []
        assert history(slow, other) == {}
    finally:
        requests.post(f"{slow.url}/interrupt", json={}, timeout=5)
        api.close()


def test_a_timeout_below_the_minimum_is_refused_before_anything_is_sent(slow: ComfyServer) -> None:
    api = Api([slow.port], job_min_timeout="2")
    try:
        r = api.post(gpu=0, timeout=0.5)
        assert r.status_code == 400, r.text
        error = r.json()
        assert error["error"] == "validation"
        assert error["field"] == "timeout"
        assert "JOB_MIN_TIMEOUT" in error["message"]
        q = queue(slow)
        assert q["queue_running"] == []
        assert q["queue_pending"] == []
        assert api.post(gpu=0, timeout=2, wait=False).status_code == 202  # the minimum itself is fine
    finally:
        requests.post(f"{slow.url}/queue", json={"clear": True}, timeout=5)
        requests.post(f"{slow.url}/interrupt", json={}, timeout=5)
        api.close()


def test_an_instance_that_stops_answering_after_the_interrupt_is_reported_hung_after_the_grace(
    slow: ComfyServer,
) -> None:
    api = Api([slow.port], job_interrupt_grace="1")
    try:
        job_id = api.post(gpu=0, timeout=3, wait=False).json()["id"]
        wait_for(lambda: api.manager.get(job_id).status == "running", 15, what="the job running")
        (slow.user / "simulator_faults.json").write_text(json.dumps({"hang_after": 0}))  # blocks its loop
        result = api.client.get(f"/jobs/{job_id}", params={"wait": 20}).json()
        assert result["status"] == "timeout"
        wait_for(lambda: api.directory.hung, 20, what="a hung report")
        assert [i for i, _ in api.directory.hung] == [0]
        assert "JOB_INTERRUPT_GRACE" in api.directory.hung[0][1]
    finally:
        api.close()


# ---------------------------------------------------------------- the grace watch, with a fake client
class Queue:
    """A ComfyClient stand-in: ``queue_position`` answers from a script."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)

    async def queue_position(self, prompt_id: str, timeout: float | None = None) -> str:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer == "error":
            raise ComfyCallError("connection refused", "connect")
        return answer


def _job() -> Job:
    return Job(id="j1", workflow={}, images=[], return_mode="filenames", gpu=0, timeout=1, created_at=0,
               created_mono=0, deadline=1, prompt_id="p1")


@pytest.mark.parametrize(
    ("answers", "stopped"),
    [
        (("running", "running", "missing"), True),  # the interrupt took within the grace
        (("error", "missing"), True),  # one failed read is not a hang
        (("running",), False),  # still running after the grace: hung
    ],
)
def test_the_grace_watch_reports_hung_only_when_the_prompt_still_runs(
    answers: tuple[str, ...], stopped: bool
) -> None:
    directory = Directory([8188])
    tracking = Tracking(directory, time.monotonic, 0.1, 0.1)
    view = directory.views[0]

    async def main() -> bool:
        return await confirm_stopped(_job(), view, Queue(*answers), tracking, grace=1.0)  # type: ignore[arg-type]

    assert asyncio.run(main()) is stopped
    assert [i for i, _ in directory.hung] == ([] if stopped else [0])
