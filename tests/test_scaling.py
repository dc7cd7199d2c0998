"""Autoscaling signals: ``core.scaling``, ``GET /scaling``, ``comfyui_machine_*`` and the RunPod
worker's concurrency, which all read the same numbers."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import requests
import requests.adapters
from prometheus_client.parser import text_string_to_metric_families
from support import Machine, txt2img, wait_for

from orchestrator.core.instances import InstanceView
from orchestrator.core.scaling import MachineLoad, machine_load
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState
from orchestrator.jobs.runpod import ReadyConcurrency
from orchestrator.monitor.collectors import MACHINE_GAUGES, MachineCollector

READY, STARTING = InstanceState.READY, InstanceState.STARTING


def view(index: int, state: InstanceState = READY, pending: int = 0, running: int = 0) -> InstanceView:
    return InstanceView(index, f"comfyui_gpu{index}", 8188 + index, state, pending, running)


# ---------------------------------------------------------------- the numbers (pure)
def test_an_idle_machine_offers_max_queue_depth_per_ready_instance() -> None:
    load = machine_load([view(0), view(1), view(2, STARTING)], {}, 8)
    assert (load.jobs_waiting, load.jobs_running, load.free_slots, load.ready_instances, load.instances) == (
        0, 0, 16, 2, 3,
    )


def test_one_prompt_runs_per_instance_and_the_rest_wait() -> None:
    # GPU 0: the probe saw 1 running + 2 pending; GPU 1: three jobs sent since the last probe.
    load = machine_load([view(0, pending=2, running=1), view(1)], {1: 3}, 4)
    assert load.jobs_running == 2
    assert load.jobs_waiting == 2 + 2
    assert load.free_slots == (4 - 3) + (4 - 3)


def test_our_jobs_seen_by_the_probe_are_not_counted_twice() -> None:
    # The probe's queue already holds the two jobs the job API sent: the load is 2, not 4.
    load = machine_load([view(0, pending=1, running=1)], {0: 2}, 8)
    assert (load.jobs_running, load.jobs_waiting, load.free_slots) == (1, 1, 6)


def test_a_full_or_not_ready_instance_offers_no_slot_but_its_jobs_still_count() -> None:
    load = machine_load([view(0, pending=9, running=1), view(1, STARTING, pending=2, running=1)], {}, 8)
    assert load.free_slots == 0
    assert load.ready_instances == 1
    assert (load.jobs_running, load.jobs_waiting) == (2, 9 + 2)


def test_a_draining_machine_offers_no_slot() -> None:
    load = machine_load([view(0), view(1)], {}, 8, draining=True)
    assert load.free_slots == 0
    assert load.ready_instances == 2
    assert load.to_dict()["draining"] is True


def test_the_collector_exports_each_field_under_its_metric_name() -> None:
    load = MachineLoad(jobs_waiting=3, jobs_running=2, free_slots=11, ready_instances=2, instances=3,
                       max_queue_depth=8, draining=True)
    samples = {m.name: m.samples[0].value for m in MachineCollector(lambda: load).collect()}
    assert samples == {
        "comfyui_machine_jobs_waiting": 3.0, "comfyui_machine_jobs_running": 2.0,
        "comfyui_machine_free_slots": 11.0, "comfyui_machine_ready_instances": 2.0,
        "comfyui_machine_draining": 1.0,
    }
    assert {field for _, _, field in MACHINE_GAUGES} <= set(load.to_dict())


# ---------------------------------------------------------------- the RunPod worker's concurrency
class Answer(requests.adapters.BaseAdapter):
    """A transport whose answer to every GET is ``self.body`` (an exception: raised)."""

    def __init__(self) -> None:
        super().__init__()
        self.body: Any = {"ready_instances": 2}
        self.calls = 0

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.calls += 1
        if isinstance(self.body, Exception):
            raise self.body
        resp = requests.Response()
        resp.status_code = 200
        resp._content = json.dumps(self.body).encode()
        resp.request = request
        return resp

    def close(self) -> None:
        pass


def test_runpod_concurrency_follows_the_ready_instances(tmp_path: Any) -> None:
    plan = tmp_path / ".orchestrator" / "plan.json"
    plan.parent.mkdir(parents=True)
    plan.write_text(json.dumps({"instances": [{}, {}, {}, {}]}))
    adapter = Answer()
    session = requests.Session()
    session.mount("http://", adapter)
    now = [0.0]
    modifier = ReadyConcurrency(load_settings({"ROOT": str(tmp_path)}), session=session, ttl=5, clock=lambda: now[0])
    assert modifier.value == 4  # the plan, before the monitor answered
    assert modifier(1) == 2
    adapter.body = {"ready_instances": 3}
    assert modifier(2) == 2  # cached within the ttl: one GET per ttl however often the SDK asks
    assert adapter.calls == 1
    now[0] = 5.0
    assert modifier(2) == 3
    now[0] = 10.0
    adapter.body = {"ready_instances": 0}
    assert modifier(3) == 1  # never 0: the SDK would read it as an unbounded queue
    now[0] = 15.0
    adapter.body = requests.ConnectionError("refused")
    assert modifier(1) == 1  # the monitor does not answer: the last value holds
    now[0] = 20.0
    adapter.body = {"unexpected": True}
    assert modifier(1) == 1


# ---------------------------------------------------------------- a real machine: all three agree
def machine_samples(m: Machine) -> dict[str, float]:
    text = requests.get(f"{m.monitor_url}/metrics", timeout=10).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("comfyui_machine_")
    }


@pytest.mark.integration
def test_scaling_metrics_and_the_runpod_concurrency_agree_on_a_running_machine(
    machine: Callable[..., Machine],
) -> None:
    m = machine(2, SIM_EXEC_TIME="8", METRICS_CACHE="0", MAX_QUEUE_DEPTH="4")
    m.up()
    wait_for(m.ready, 60, 0.2, what="both instances READY")
    idle = requests.get(f"{m.monitor_url}/scaling", timeout=10).json()
    assert idle == {"jobs_waiting": 0, "jobs_running": 0, "free_slots": 8, "ready_instances": 2,
                    "instances": 2, "max_queue_depth": 4, "draining": False}

    accepted: list[int] = []

    def submit(i: int) -> None:
        body = {"workflow": txt2img(f"scale{i}", seed=i), "wait": False}
        accepted.append(requests.post(f"{m.monitor_url}/jobs", json=body, timeout=30).status_code)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert accepted == [202, 202, 202]

    def busy() -> dict[str, Any] | None:
        body: dict[str, Any] = requests.get(f"{m.monitor_url}/scaling", timeout=10).json()
        return body if body["jobs_running"] == 2 else None

    scaling = wait_for(busy, 30, 0.2, what="two jobs running")
    metrics = machine_samples(m)
    # Three jobs on two instances (eight seconds each): two run, one waits, 4+4-3 slots left.
    assert (scaling["jobs_running"], scaling["jobs_waiting"], scaling["free_slots"]) == (2, 1, 5)
    assert metrics == {
        "comfyui_machine_jobs_waiting": 1.0, "comfyui_machine_jobs_running": 2.0,
        "comfyui_machine_free_slots": 5.0, "comfyui_machine_ready_instances": 2.0,
        "comfyui_machine_draining": 0.0,
    }
    settings = load_settings({"ROOT": str(m.root), "ORCHESTRATOR_PORT": str(m.monitor_port)})
    assert ReadyConcurrency(settings)(1) == 2
