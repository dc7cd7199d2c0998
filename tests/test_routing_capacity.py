"""Capacity and affinity routing: pure scoring (core.routing_score), what is learned from completed
jobs (jobs.speeds), and route() ranking by it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orchestrator.comfy.protocol import NodeTiming
from orchestrator.core.instances import InstanceView
from orchestrator.core.routing import RouteError, route
from orchestrator.core.routing_score import Estimate, explain, finish_seconds, profile, rank
from orchestrator.core.settings import load_settings
from orchestrator.core.states import InstanceState
from orchestrator.jobs.speeds import SpeedBook

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workflow.json"
READY = InstanceState.READY


def view(index: int, pending: int = 0, state: InstanceState = READY) -> InstanceView:
    return InstanceView(index, f"comfyui_gpu{index}", 8188 + index, state, pending, 0)


def workflow(ckpt: str = "a.safetensors", seed: int = 1, lora: str | None = None) -> dict[str, Any]:
    wf: dict[str, Any] = json.loads(EXAMPLE.read_text())["workflow"]
    wf["4"]["inputs"]["ckpt_name"] = ckpt
    wf["3"]["inputs"]["seed"] = seed
    if lora:
        wf["10"] = {"class_type": "LoraLoader", "inputs": {"lora_name": lora, "model": ["4", 0], "clip": ["4", 1],
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    return wf


def ranking(estimates: dict[int, Estimate], fleet: float = 1.0) -> Any:
    return lambda v, load: rank(load, estimates.get(v.index, Estimate()), fleet)


# ---------------------------------------------------------------- job profiles
def test_jobs_alike_share_a_class_and_their_model_files_are_known() -> None:
    a1, a2 = profile(workflow(seed=1)), profile(workflow(seed=2))
    assert a1.job_class == a2.job_class  # seeds and prompts do not change the class
    assert profile(workflow("b.safetensors")).job_class != a1.job_class
    assert a1.models == {"a.safetensors"}
    assert a1.loader_nodes == {"4"}
    with_lora = profile(workflow(lora="style.safetensors"))
    assert with_lora.models == {"a.safetensors", "style.safetensors"}
    assert with_lora.loader_nodes == {"4", "10"}
    assert profile({"1": {"class_type": "KSampler", "inputs": {"sampler_name": "euler"}}}).models == frozenset()


# ---------------------------------------------------------------- scoring (pure)
def test_the_expected_finish_weighs_jobs_ahead_by_the_instances_speed() -> None:
    fast, slow = Estimate(1.0, 1.0, None, True), Estimate(3.0, 3.0, None, True)
    assert finish_seconds(2, fast, 1.0) == 3.0  # 2 ahead x 1 s + 1 s
    assert finish_seconds(0, slow, 1.0) == 3.0
    assert finish_seconds(1, Estimate(), 2.0) == 4.0  # nothing learned: the fleet's mean
    assert finish_seconds(0, Estimate(1.0, 1.0, 5.0, affine=False), 1.0) == 6.0  # plus a model load
    assert finish_seconds(0, Estimate(1.0, 1.0, 5.0, affine=True), 1.0) == 1.0


def test_the_faster_instance_gets_the_job_despite_a_longer_queue() -> None:
    estimates = {0: Estimate(3.0, 3.0), 1: Estimate(1.0, 1.0)}
    views = [view(0), view(1, pending=1)]
    assert route(views, {}, max_queue_depth=8).index == 0  # least queue
    assert route(views, {}, max_queue_depth=8, rank=ranking(estimates)).index == 1  # 2 s vs 3 s
    assert route([view(0), view(1, pending=3)], {}, max_queue_depth=8, rank=ranking(estimates)).index == 0


def test_a_full_instance_is_never_chosen_however_fast() -> None:
    estimates = {0: Estimate(30.0, 30.0), 1: Estimate(0.1, 0.1)}
    assert route([view(0), view(1, pending=4)], {}, max_queue_depth=4, rank=ranking(estimates)).index == 0
    with pytest.raises(RouteError) as info:
        route([view(0, pending=4), view(1, pending=4)], {}, max_queue_depth=4, rank=ranking(estimates))
    assert info.value.reason == "saturated"


def test_with_nothing_learned_capacity_routing_is_least_queue() -> None:
    views = [view(0, pending=2), view(1), view(2)]
    assert route(views, {}, max_queue_depth=8, rank=ranking({})).index == 1


def test_mixed_gpus_get_jobs_in_proportion_to_their_speed() -> None:
    """40 jobs at once to a GPU 3x slower (0) and a fast one (1): about a quarter go to the slow one."""
    estimates = {0: Estimate(3.0, 3.0), 1: Estimate(1.0, 1.0)}
    inflight: Counter[int] = Counter()
    for _ in range(40):
        inflight[route([view(0), view(1)], inflight, max_queue_depth=100, rank=ranking(estimates)).index] += 1
    assert inflight[0] == 10
    assert inflight[1] == 30
    # Least-queue splits them evenly: the slow GPU's 20 jobs take 60 s against 30 s here.
    even: Counter[int] = Counter()
    for _ in range(40):
        even[route([view(0), view(1)], even, max_queue_depth=100).index] += 1
    assert even[0] == even[1] == 20


def test_the_instance_holding_the_models_is_preferred_while_its_queue_allows() -> None:
    holds, other = Estimate(1.0, 1.0, 4.0, affine=True), Estimate(1.0, 1.0, 4.0, affine=False)
    est = {0: other, 1: holds}
    assert route([view(0), view(1, pending=2)], {}, max_queue_depth=8, rank=ranking(est)).index == 1  # 3 s vs 5 s
    assert route([view(0), view(1, pending=5)], {}, max_queue_depth=8, rank=ranking(est)).index == 0  # 6 s vs 5 s
    # Load time not learned yet: affinity still breaks the tie.
    est = {0: Estimate(1.0, 1.0), 1: Estimate(1.0, 1.0, affine=True)}
    assert route([view(0), view(1)], {}, max_queue_depth=8, rank=ranking(est)).index == 1


def test_the_reason_names_the_choice_and_the_alternatives() -> None:
    est = {0: Estimate(3.0, 3.0), 1: Estimate(1.0, 1.0, affine=True)}
    candidates = [(view(0), 0), (view(1), 1)]
    reason = explain("capacity", view(1), candidates, est, 1.0)
    assert reason == ("earliest expected finish: GPU 1 done in ~2.00 s (1 ahead; models loaded); "
                      "vs GPU 0 done in ~3.00 s (0 ahead)")
    assert explain("least_queue", view(0), candidates, est, 1.0) == "fewest jobs ahead (0); GPU 1: 1"
    assert explain("capacity", view(1), candidates, est, 1.0, pinned=True).startswith("gpu 1 was requested")


# ---------------------------------------------------------------- learning from completed jobs
def test_speeds_are_moving_averages_of_run_time_without_model_loads() -> None:
    book = SpeedBook(alpha=0.5)
    job = profile(workflow())
    loaded = [NodeTiming("4", "CheckpointLoaderSimple", 2.0, False), NodeTiming("3", "KSampler", 1.0, False)]
    book.record(0, job, 3.0, loaded)  # 2 s of it loading the checkpoint
    cached = [NodeTiming("4", "CheckpointLoaderSimple", 0.0, True), NodeTiming("3", "KSampler", 2.0, False)]
    book.record(0, job, 2.0, cached)
    est = book.estimate(0, job)
    assert (est.run_seconds, est.mean_seconds, est.load_seconds) == (1.5, 1.5, 2.0)
    other_class = profile(workflow("b.safetensors"))
    assert book.estimate(0, other_class).run_seconds is None  # not learned for that class
    assert book.estimate(1, job) == Estimate(None, None, 2.0, False)  # GPU 1: the fleet's load time
    assert book.fleet_seconds() == 1.5


def test_the_models_of_the_last_job_routed_make_an_instance_affine() -> None:
    book = SpeedBook()
    a, b = profile(workflow("a.safetensors")), profile(workflow("b.safetensors"))
    assert not book.estimate(0, a).affine
    book.routed(0, a)
    assert book.estimate(0, a).affine
    assert not book.estimate(0, b).affine
    book.routed(0, b)
    assert book.estimate(0, b).affine
    assert not book.estimate(0, a).affine
    assert book.estimate(0, profile({"1": {"class_type": "EmptyImage", "inputs": {}}})).affine  # loads nothing


def test_routing_policy_is_a_setting_with_capacity_by_default() -> None:
    assert load_settings({"ROOT": "/x"}).routing_policy == "capacity"
    assert load_settings({"ROOT": "/x", "ROUTING_POLICY": "least_queue"}).routing_policy == "least_queue"
    with pytest.raises(Exception, match="ROUTING_POLICY"):
        load_settings({"ROOT": "/x", "ROUTING_POLICY": "random"})


# ---------------------------------------------------------------- the simulator's speed and model-load knobs
def test_the_simulators_speed_and_model_load_settings_are_validated() -> None:
    from orchestrator.simulator.faults import from_env

    faults, warnings = from_env({"SIM_SPEED": "0.25", "SIM_MODEL_LOAD_SECONDS": "2"})
    assert (faults.speed, faults.model_load_seconds, warnings) == (0.25, 2.0, [])
    faults, warnings = from_env({"SIM_SPEED": "0", "SIM_MODEL_LOAD_SECONDS": "-1"})
    assert (faults.speed, faults.model_load_seconds) == (1.0, 0.0)
    assert len(warnings) == 2
    assert "SIM_SPEED" not in warnings[0]
    assert any("speed=" in w for w in warnings)
    assert any("model_load_seconds=" in w for w in warnings)


def test_a_slow_simulator_with_a_model_load_cost_is_learned_from_its_jobs(tmp_path: Path) -> None:
    """SIM_SPEED and SIM_MODEL_LOAD_SECONDS as the router sees them: the checkpoint loader takes the
    load time when it runs, is cached while the checkpoint stays, runs again for another one."""
    from prometheus_client import CollectorRegistry
    from support import ComfyServer, ServedApp, http_client, jobs_app

    from orchestrator.jobs.tracker import JobManager
    from orchestrator.simulator.tree import write_code_tree

    write_code_tree(tmp_path / "ComfyUI")
    env = {"SIM_EXEC_TIME": "0.05", "SIM_SPEED": "0.25", "SIM_MODEL_LOAD_SECONDS": "0.6"}
    server = ComfyServer(tmp_path / "ComfyUI", tmp_path / "inst", env=env)

    class Directory:
        def snapshot(self) -> list[InstanceView]:
            return [InstanceView(0, "comfyui_gpu0", server.port, READY)]

        def report_hung(self, index: int, reason: str) -> None:
            raise AssertionError(reason)

    try:
        server.wait_ready()
        manager = JobManager(load_settings({"ROOT": "/x"}), Directory(), CollectorRegistry(), check_interval=0.1)
        with ServedApp(jobs_app(manager)) as served, http_client(served.url, timeout=60) as client:
            results = [client.post("/jobs", json={"workflow": workflow(ckpt, seed)}).json()
                       for ckpt, seed in (("a.ckpt", 1), ("a.ckpt", 2), ("b.ckpt", 3))]
    finally:
        server.stop()
    loader = [next(n for n in r["nodes"] if n["id"] == "4") for r in results]
    assert [n["cached"] for n in loader] == [False, True, False]
    assert loader[0]["seconds"] >= 0.6
    assert loader[2]["seconds"] >= 0.6
    assert results[1]["run_seconds"] >= 0.15  # 0.05 s at a quarter of the speed (0.2 s), less event jitter
    learned = manager.speeds.snapshot()[0]
    assert learned["jobs"] == 3
    assert learned["load_seconds"] is not None
    assert learned["load_seconds"] >= 0.6
    assert learned["mean_seconds"] is not None
    assert learned["mean_seconds"] >= 0.15


def test_an_instance_not_measured_yet_gets_a_job_when_the_estimates_tie() -> None:
    """GPU 1 has no completed job: it counts at the fleet's mean, and wins the tie to be measured."""
    est = {0: Estimate(3.0, 3.0)}
    assert route([view(0), view(1)], {}, max_queue_depth=8, rank=ranking(est, fleet=3.0)).index == 1
    assert route([view(0), view(1, pending=1)], {}, max_queue_depth=8, rank=ranking(est, fleet=3.0)).index == 0


def test_choose_instance_applies_the_policy_and_says_why() -> None:
    from orchestrator.jobs.speeds import choose_instance

    book = SpeedBook()
    a = profile(workflow("a.safetensors"))
    nodes = [NodeTiming("3", "KSampler", 1.0, False)]
    book.record(0, a, 3.0, nodes)  # GPU 0: 3 s a job
    book.record(1, a, 1.0, nodes)  # GPU 1: 1 s
    views = [view(0), view(1, pending=1)]
    capacity = load_settings({"ROOT": "/x", "MAX_QUEUE_DEPTH": "8"})
    least_queue = load_settings({"ROOT": "/x", "ROUTING_POLICY": "least_queue"})
    chosen, info = choose_instance(views, {}, a, book, capacity)
    assert (chosen.index, info.instance, info.policy) == (1, "comfyui_gpu1", "capacity")
    assert info.reason.startswith("earliest expected finish: GPU 1 done in ~2.00 s")
    assert book.estimate(1, a).affine  # it holds the job's checkpoint now
    chosen, info = choose_instance(views, {}, a, book, least_queue)
    assert (chosen.index, info.policy, info.reason) == (0, "least_queue", "fewest jobs ahead (0); GPU 1: 1")
    chosen, info = choose_instance(views, {}, a, book, capacity, gpu=0)
    assert (chosen.index, info.policy) == (0, "pinned")
    with pytest.raises(RouteError):
        choose_instance(views, {}, a, book, capacity, exclude=(0, 1))
