"""The job API: routing, tracking on simulated instances, results, metrics, HTTP contract."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from support import (
    ComfyServer,
    ServedApp,
    http_client,
    jobs_app,
    seed_below_min_node_errors,
    wait_for,
)

from orchestrator.comfy.client import ComfySocket
from orchestrator.comfy.protocol import (
    NodeProgress,
    classify_event,
    history_outcome,
    history_outputs,
    history_times,
    prompt_rejection,
)
from orchestrator.core.http import validation_message
from orchestrator.core.instances import InstanceView
from orchestrator.core.routing import RouteError, all_saturated, instance_load, route
from orchestrator.core.settings import Settings, load_settings
from orchestrator.core.states import InstanceState
from orchestrator.core.workflow import WorkflowError
from orchestrator.jobs.journal import JobJournal
from orchestrator.jobs.schemas import InputImage, JobResponse, decode_image
from orchestrator.jobs.store import Job, ResultStore
from orchestrator.jobs.tracker import JobManager

READY = InstanceState.READY
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workflow.json"


def view(index: int, state: InstanceState = READY, pending: int = 0, running: int = 0, port: int = 0) -> InstanceView:
    return InstanceView(index, f"comfyui_gpu{index}", port or 8188 + index, state, pending, running)


def example() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text())["workflow"]


# ---------------------------------------------------------------- routing (pure)
def test_routing_picks_the_ready_instance_with_the_least_load() -> None:
    views = [
        view(0, pending=2),
        view(1, running=1),
        view(2, InstanceState.STARTING),
        view(3, pending=1, running=1),
    ]
    assert route(views, {}, max_queue_depth=8).index == 1


def test_routing_counts_jobs_sent_since_the_last_probe() -> None:
    views = [view(0), view(1)]
    assert route(views, {0: 3}, max_queue_depth=8).index == 1
    assert route(views, {0: 1, 1: 1}, max_queue_depth=8).index == 0  # ties go to the lowest GPU


def test_our_own_jobs_seen_by_a_probe_are_not_counted_twice() -> None:
    assert instance_load(view(0, pending=2, running=1), 3) == 3
    assert instance_load(view(0, pending=4, running=1), 3) == 5


def test_a_pinned_gpu_is_used_even_when_others_are_idle() -> None:
    assert route([view(0), view(1, pending=5)], {}, max_queue_depth=8, gpu=1).index == 1


def test_an_unknown_pinned_gpu_is_a_client_error_listing_the_gpus() -> None:
    with pytest.raises(RouteError, match=r"gpu 7 is not an instance on this machine \(GPUs: 0, 1\)") as info:
        route([view(0), view(1)], {}, max_queue_depth=8, gpu=7)
    assert info.value.status == 400


def test_a_pinned_gpu_that_is_not_ready_is_unavailable() -> None:
    with pytest.raises(RouteError, match="gpu 1 \\(comfyui_gpu1\\) is RESTARTING") as info:
        route([view(0), view(1, InstanceState.RESTARTING)], {}, max_queue_depth=8, gpu=1)
    assert (info.value.status, info.value.reason) == (503, "not_ready")


def test_when_every_ready_instance_is_full_the_job_is_refused() -> None:
    views = [view(0, pending=8), view(1, pending=3, running=1), view(2, InstanceState.FATAL)]
    with pytest.raises(RouteError, match="MAX_QUEUE_DEPTH") as info:
        route(views, {1: 4}, max_queue_depth=4)
    assert (info.value.status, info.value.reason) == (503, "saturated")
    assert all_saturated(views, {1: 4}, 4)
    assert not all_saturated(views, {1: 3}, 8)
    assert not all_saturated([view(0, InstanceState.STARTING)], {}, 1)


def test_no_ready_instance_names_the_states() -> None:
    with pytest.raises(RouteError, match=r"no READY instance.*0:STARTING, 1:UNHEALTHY") as info:
        route([view(0, InstanceState.STARTING), view(1, InstanceState.UNHEALTHY)], {}, max_queue_depth=8)
    assert info.value.reason == "no_instance"


def test_an_excluded_instance_is_not_chosen_again() -> None:
    assert route([view(0), view(1, pending=3)], {}, max_queue_depth=8, exclude=[0]).index == 1


# ---------------------------------------------------------------- events and history (pure)
def test_websocket_events_map_onto_the_prompts_progress() -> None:
    assert classify_event({"type": "execution_start", "data": {"prompt_id": "p"}}, "p").kind == "started"
    assert classify_event({"type": "executing", "data": {"node": "3", "prompt_id": "p"}}, "p").kind == "started"
    assert classify_event({"type": "executing", "data": {"node": None, "prompt_id": "p"}}, "p").kind == "done"
    assert classify_event({"type": "execution_success", "data": {"prompt_id": "p"}}, "p").kind == "done"
    assert classify_event({"type": "executing", "data": {"node": None, "prompt_id": "q"}}, "p").kind == "other"
    assert classify_event({"type": "status", "data": {"status": {}}}, "p").kind == "other"
    assert classify_event({"type": "crystools.monitor", "data": None}, "p").kind == "other"


def test_node_progress_counts_upstream_and_fork_events() -> None:
    upstream = NodeProgress(total=4)
    for message in [
        {"type": "execution_cached", "data": {"nodes": ["1"], "prompt_id": "p"}},
        {"type": "executing", "data": {"node": "2", "prompt_id": "p"}},
        {"type": "executing", "data": {"node": "9", "prompt_id": "other"}},
        {"type": "executing", "data": {"node": "3", "prompt_id": "p"}},
    ]:
        upstream.update(message, "p")
    assert upstream.done == 2  # 1 cached, 2 finished when 3 started
    upstream.update({"type": "executed", "data": {"node": "3", "prompt_id": "p"}}, "p")
    assert upstream.done == 3
    upstream.update({"type": "executing", "data": {"node": None, "prompt_id": "p"}}, "p")
    assert upstream.done == 4

    fork = NodeProgress(total=3)
    for node in ("4", "5"):
        data = {"node": node, "prompt_id": "p", "class_type": "X", "progress": {"current": 1, "total": 3}}
        fork.update({"type": "node_executing", "data": data}, "p")
        fork.update({"type": "executing", "data": {"node": node, "prompt_id": "p"}}, "p")  # same node: once
    assert fork.done == 1
    assert classify_event({"type": "node_executing", "data": {"node": "4", "prompt_id": "p"}}, "p").kind == "started"


def test_an_execution_error_names_the_node_and_message() -> None:
    event = classify_event(
        {
            "type": "execution_error",
            "data": {
                "prompt_id": "p",
                "node_id": "9",
                "node_type": "SimulatedError",
                "exception_type": "RuntimeError",
                "exception_message": "boom\n",
            },
        },
        "p",
    )
    assert event.kind == "error"
    assert event.error is not None
    assert event.error.message == "node 9 (SimulatedError) failed: RuntimeError: boom"
    assert (event.error.node_id, event.error.node_type, event.error.type) == (
        "9",
        "SimulatedError",
        "execution",
    )


def test_an_interruption_is_reported_as_such() -> None:
    event = classify_event({"type": "execution_interrupted", "data": {"prompt_id": "p", "node_id": "3"}}, "p")
    assert event.kind == "interrupted"
    assert event.error is not None
    assert event.error.type == "interrupted"


HISTORY = {
    "prompt": [1, "p", {}, {}, ["9"]],
    "outputs": {
        "9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]},
        "12": {"images": [{"filename": "b.png", "subfolder": "sub", "type": "temp"}], "text": ["hello"]},
    },
    "status": {
        "status_str": "success",
        "completed": True,
        "messages": [
            ["execution_start", {"prompt_id": "p", "timestamp": 1000}],
            ["execution_cached", {"nodes": [], "prompt_id": "p", "timestamp": 1001}],
            ["execution_success", {"prompt_id": "p", "timestamp": 3500}],
        ],
    },
}


def test_history_outputs_list_every_file_in_node_order() -> None:
    files = history_outputs(HISTORY)
    assert [(f.node_id, f.filename, f.subfolder, f.type) for f in files] == [
        ("9", "ComfyUI_00001_.png", "", "output"),
        ("12", "b.png", "sub", "temp"),
    ]


def test_history_gives_the_outcome_and_execution_time() -> None:
    assert history_outcome(HISTORY).kind == "done"
    assert history_times(HISTORY) == 2.5
    failed = {
        "status": {
            "status_str": "error",
            "messages": [
                [
                    "execution_error",
                    {
                        "node_id": "4",
                        "node_type": "CheckpointLoaderSimple",
                        "exception_type": "FileNotFoundError",
                        "exception_message": "x",
                    },
                ]
            ],
        }
    }
    outcome = history_outcome(failed)
    assert outcome.kind == "error"
    assert outcome.error is not None
    assert outcome.error.node_id == "4"
    assert history_times({"status": {}}) is None


def test_a_refused_prompt_names_the_node_and_input() -> None:
    body = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": seed_below_min_node_errors(),
    }
    info = prompt_rejection(body, example())
    assert info.type == "validation"
    assert info.message.startswith("node 3 (KSampler) input 'seed': Value -1 smaller than min of 0")
    assert (info.node_id, info.field, info.node_type) == ("3", "inputs.seed", "KSampler")


def test_an_unknown_class_refusal_finds_the_node_in_the_details() -> None:
    body = {
        "error": {
            "type": "invalid_prompt",
            "message": "Cannot execute because node Foo does not exist.",
            "details": "Node ID '#4'",
            "extra_info": {},
        },
        "node_errors": {},
    }
    info = prompt_rejection(body, example())
    assert info.node_id == "4"
    assert "Cannot execute because node Foo does not exist." in info.message


def test_input_images_accept_plain_base64_and_data_uris() -> None:
    raw = b"\x89PNG fake"
    assert decode_image(InputImage(name="a.png", image=base64.b64encode(raw).decode())) == raw
    assert (
        decode_image(InputImage(name="a.png", image="data:image/png;base64," + base64.b64encode(raw).decode())) == raw
    )
    with pytest.raises(WorkflowError, match="not valid base64"):
        decode_image(InputImage(name="a.png", image="***"))
    with pytest.raises(WorkflowError, match="invalid file name"):
        decode_image(InputImage(name="../etc/passwd", image=""))


def test_pydantic_errors_become_one_line_naming_the_node() -> None:
    message, node_id, field = validation_message(
        [{"loc": ("body", "workflow", "3"), "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    )
    assert message == "workflow.3: Input should be a valid dictionary"
    assert (node_id, field) == ("3", None)
    message, _, _ = validation_message([{"loc": ("body", 5), "type": "json_invalid", "ctx": {"error": "bad"}}])
    assert message == "the body is not valid JSON (bad)"


# ---------------------------------------------------------------- results store (pure)
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _job(store: ResultStore, job_id: str) -> Any:
    job = Job(
        id=job_id,
        workflow={},
        images=[],
        return_mode="filenames",
        gpu=None,
        timeout=1,
        created_at=0,
        created_mono=0,
        deadline=1,
    )
    store.add(job)
    return job


def test_finished_results_expire_after_the_ttl_but_jobs_in_flight_stay() -> None:
    clock = FakeClock()
    store = ResultStore(max_items=10, ttl=60, clock=clock)
    done, running = _job(store, "a"), _job(store, "b")
    store.finished(done)
    clock.now += 59
    assert store.get("a") is done
    clock.now += 2
    assert store.get("a") is None
    assert store.get("b") is running


def test_only_the_newest_finished_results_are_kept() -> None:
    store = ResultStore(max_items=2, ttl=3600, clock=FakeClock())
    jobs = [_job(store, str(i)) for i in range(4)]
    for job in jobs:
        store.finished(job)
    assert [store.get(str(i)) is not None for i in range(4)] == [False, False, True, True]


# ---------------------------------------------------------------- simulated instances
class Sim(ComfyServer):
    """One simulator process (the ComfyUI stand-in) on a free port, in ``base/gpu<index>``."""

    def __init__(self, tree: Path, base: Path, index: int, exec_time: float, protocol: str = "upstream") -> None:
        self.index = index
        self.protocol = protocol
        self.dir = base / f"gpu{index}"
        env = {"SIM_EXEC_TIME": str(exec_time), "SIM_PROTOCOL": protocol}
        super().__init__(tree, self.dir, env=env, log_path=self.dir / "log.txt")

    def queue(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/queue", timeout=5).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)


@pytest.fixture(scope="module")
def sim_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.simulator.tree import write_code_tree

    tree = tmp_path_factory.mktemp("comfy") / "ComfyUI"
    write_code_tree(tree)
    return tree


def start_sims(tree: Path, base: Path, exec_times: list[float], protocol: str = "upstream") -> list[Sim]:
    sims = [Sim(tree, base, i, t, protocol) for i, t in enumerate(exec_times)]
    try:
        for sim in sims:
            sim.wait_ready()
    except BaseException:
        for sim in sims:
            sim.stop()
        raise
    return sims


@pytest.fixture(scope="module", params=["upstream", "fork"])
def protocol(request: pytest.FixtureRequest) -> str:
    """Every job test runs against upstream ComfyUI's /ws and the fleet fork's (SIM_PROTOCOL)."""
    return str(request.param)


@pytest.fixture(scope="module")
def fleet(sim_tree: Path, tmp_path_factory: pytest.TempPathFactory, protocol: str) -> Iterator[list[Sim]]:
    """Four simulated instances, 0.4 s per prompt."""
    sims = start_sims(sim_tree, tmp_path_factory.mktemp("fleet"), [0.4] * 4, protocol)
    yield sims
    for sim in sims:
        sim.stop()


class FakeDirectory:
    """The monitor's instance directory over simulators; states are set by the test."""

    def __init__(self, sims: list[Sim]) -> None:
        self.views = {s.index: InstanceView(s.index, f"comfyui_gpu{s.index}", s.port, READY) for s in sims}
        self.hung: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def snapshot(self) -> list[InstanceView]:
        with self.lock:
            return list(self.views.values())

    def set_state(self, index: int, state: InstanceState) -> None:
        import dataclasses

        with self.lock:
            self.views[index] = dataclasses.replace(self.views[index], state=state)

    def report_hung(self, index: int, reason: str) -> None:
        # Like the monitor: a hung instance is not READY until it has been restarted.
        self.hung.append((index, reason))
        self.set_state(index, InstanceState.UNHEALTHY)


class JobApi:
    """The job router on its own FastAPI app, served by uvicorn in a thread."""

    def __init__(self, settings: Settings, directory: FakeDirectory, journal: JobJournal | None = None) -> None:
        from fastapi.responses import PlainTextResponse

        self.registry = CollectorRegistry()
        self.manager = JobManager(
            settings, directory, self.registry, poll_interval=0.1, check_interval=0.1, journal=journal
        )
        self.directory = directory
        app = jobs_app(self.manager)

        @app.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
        def metrics() -> str:
            return generate_latest(self.registry).decode()

        self.app = app
        self.served = ServedApp(app)
        self.port = self.served.port
        self.client = http_client(f"http://127.0.0.1:{self.port}", timeout=60)

    def post(self, body: dict[str, Any], **kw: Any) -> requests.Response:
        return self.client.post("/jobs", json=body, **kw)

    def stop(self) -> None:
        self.client.close()
        self.served.stop()


def make_settings(**values: str) -> Settings:
    env = {"ROOT": "/nonexistent-root", "PROBE_INTERVAL": "2", **{k.upper(): v for k, v in values.items()}}
    return load_settings(env)


@pytest.fixture
def api_factory() -> Iterator[Callable[..., JobApi]]:
    made: list[JobApi] = []

    def make(sims: list[Sim], **settings: str) -> JobApi:
        api = JobApi(make_settings(**settings), FakeDirectory(sims))
        made.append(api)
        return api

    yield make
    for api in made:
        api.stop()


_seed = iter(range(1, 1 << 30))


def job(**extra: Any) -> dict[str, Any]:
    """The example workflow with a fresh seed (identical graphs are served from cache)."""
    return {"workflow": example(), "seed": next(_seed), **extra}


def post_all(api: JobApi, bodies: list[dict[str, Any]]) -> list[requests.Response]:
    results: list[requests.Response | None] = [None] * len(bodies)

    def one(i: int) -> None:
        with http_client(api.client.base_url, timeout=60) as c:
            results[i] = c.post("/jobs", json=bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]



# ---------------------------------------------------------------- integration: the fleet
def test_a_job_runs_and_returns_its_output_files(fleet: list[Sim], api_factory: Callable[..., JobApi]) -> None:
    api = api_factory(fleet)
    r = api.post(job())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    assert body["outputs"][0]["filename"].startswith("ComfyUI_")
    assert body["outputs"][0]["node_id"] == "9"
    gpu = body["instance"]["gpu"]
    assert (fleet[gpu].output / body["outputs"][0]["filename"]).is_file()
    assert body["execution_time_seconds"] >= 0.3  # SIM_EXEC_TIME=0.4: the prompt's own run, not 0
    assert body["queue_wait_seconds"] >= 0
    assert body["attempts"] == 1
    assert body["prompt_id"]
    assert api.client.get(f"/jobs/{body['id']}").json()["status"] == "success"


def finished_at_success(sim: Sim, prompt_id: str) -> float:
    """Unix time of the server's execution_success (its executing-null follows at once)."""
    entry = requests.get(f"{sim.url}/history/{prompt_id}", timeout=5).json()[prompt_id]
    (ts,) = [m[1]["timestamp"] for m in entry["status"]["messages"] if m[0] == "execution_success"]
    return float(ts) / 1000.0


def test_a_job_is_seen_finished_soon_after_the_server_is_done(
    fleet: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    api = api_factory(fleet)
    job_id = api.post(job(wait=False)).json()["id"]
    body = wait_for(
        lambda: (b := api.client.get(f"/jobs/{job_id}").json())["status"] in {"success", "error", "timeout"} and b,
        timeout=10,
        interval=0.02,
    )
    assert body["status"] == "success", body
    assert body["progress"] == {"nodes_done": 7, "nodes_total": 7}
    # Seen finished after the server's own finish; how soon is measured by bench/bench_jobs.py.
    assert body["finished_at"] >= finished_at_success(fleet[body["instance"]["gpu"]], body["prompt_id"]) - 0.5


def test_a_fork_job_whose_socket_delivers_nothing_still_finishes_via_history(
    sim_tree: Path, tmp_path: Path, api_factory: Callable[..., JobApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def keep_own_id(socket: ComfySocket, timeout: float = 2.0) -> tuple[str, str]:
        return socket.client_id, ""  # as a tracker that ignores the fork's client_id message would

    monkeypatch.setattr(ComfySocket, "read_greeting", keep_own_id)
    sims = start_sims(sim_tree, tmp_path, [0.3], protocol="fork")
    try:
        api = api_factory(sims)
        job_id = api.post(job(wait=False)).json()["id"]
        body = api.client.get(f"/jobs/{job_id}", params={"wait": 10}).json()
        assert body["status"] == "success", body
        assert (sims[0].output / body["outputs"][0]["filename"]).is_file()
    finally:
        for sim in sims:
            sim.stop()


def test_an_instance_that_turned_into_the_fork_is_still_followed_and_greeted_next_time(
    sim_tree: Path, tmp_path: Path, api_factory: Callable[..., JobApi]
) -> None:
    sims = start_sims(sim_tree, tmp_path, [0.2], protocol="fork")
    try:
        api = api_factory(sims)
        api.manager.dialects[0] = "upstream"  # learned before the instance was restarted on the fork
        first = api.post(job()).json()
        assert first["status"] == "success", first  # events went nowhere: /history found it
        assert api.manager.dialects[0] == "fork"  # the client_id message seen on the socket
        second = api.post(job()).json()
        assert second["status"] == "success"
        assert second["progress"] == {"nodes_done": 7, "nodes_total": 7}
    finally:
        for sim in sims:
            sim.stop()


def test_a_burst_of_jobs_spreads_over_all_four_instances(fleet: list[Sim], api_factory: Callable[..., JobApi]) -> None:
    api = api_factory(fleet)
    responses = post_all(api, [job() for _ in range(12)])
    assert all(r.status_code == 200 and r.json()["status"] == "success" for r in responses), [r.text for r in responses]
    per_gpu = collections_counter(r.json()["instance"]["gpu"] for r in responses)
    assert set(per_gpu) == {0, 1, 2, 3}
    assert max(per_gpu.values()) - min(per_gpu.values()) <= 1, per_gpu
    # The speed-up this spread buys (1 vs 4 instances) is measured by bench/bench_jobs.py (throughput).
    assert api.manager.inflight() == {0: 0, 1: 0, 2: 0, 3: 0}


def collections_counter(items: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def test_a_pinned_job_runs_on_its_gpu_even_when_others_are_idle(
    fleet: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    api = api_factory(fleet)
    responses = post_all(api, [job(gpu=2) for _ in range(3)])
    assert [r.json()["instance"]["gpu"] for r in responses] == [2, 2, 2]
    r = api.post(job(gpu=9))
    assert r.status_code == 400
    assert r.json()["message"] == "gpu 9 is not an instance on this machine (GPUs: 0, 1, 2, 3)"
    api.directory.set_state(1, InstanceState.RESTARTING)
    r = api.post(job(gpu=1))
    assert r.status_code == 503
    assert r.json()["error"] == "not_ready"


def test_when_every_instance_is_full_new_jobs_get_503_with_retry_after(
    fleet: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    api = api_factory(fleet[:2], max_queue_depth="2")
    accepted = [api.post(job(wait=False)) for _ in range(4)]
    assert [r.status_code for r in accepted] == [202] * 4
    assert accepted[0].headers["location"] == f"/jobs/{accepted[0].json()['id']}"
    assert api.manager.inflight() == {0: 2, 1: 2}
    refused = api.post(job())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"] == "saturated"
    assert api.manager.saturated()
    finished = [api.client.get(f"/jobs/{r.json()['id']}", params={"wait": 20}).json() for r in accepted]
    assert [f["status"] for f in finished] == ["success"] * 4
    assert api.post(job()).status_code == 200
    assert api.registry.get_sample_value("comfyui_jobs_total", {"status": "rejected"}) == 1


def test_an_override_on_a_missing_node_is_a_400_naming_the_node(
    fleet: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    api = api_factory(fleet)
    r = api.post(job(overrides=[{"node_id": "66", "field": "inputs.text", "value": "x"}]))
    assert r.status_code == 400
    assert r.json()["node_id"] == "66"
    assert "node 66 is not in the workflow" in r.json()["message"]
    r = api.post({"workflow": {"3": "KSampler"}})
    assert r.status_code == 400
    assert r.json()["node_id"] == "3"
    r = api.client.post("/jobs", data=b"{not json")
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["message"]


def test_an_invalid_input_found_by_the_instance_is_a_400_naming_node_and_input(
    fleet: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    api = api_factory(fleet)
    r = api.post({"workflow": example(), "overrides": [{"node_id": "3", "field": "inputs.steps", "value": 0}]})
    assert r.status_code == 400, r.text
    body = r.json()
    assert (body["node_id"], body["field"]) == ("3", "inputs.steps")
    assert body["message"].startswith("node 3 (KSampler) input 'steps': Value 0 smaller than min of 1")
    assert api.registry.get_sample_value("comfyui_jobs_total", {"status": "invalid"}) == 1


def test_a_node_that_fails_gives_an_error_result_naming_it(
    fleet: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    api = api_factory(fleet)
    wf = example()
    wf["20"] = {"class_type": "SimulatedError", "inputs": {"input": ["8", 0], "message": "kaboom"}}
    r = api.post({"workflow": wf, "seed": next(_seed)})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "error"
    assert body["error"]["type"] == "execution"
    assert body["error"]["node_id"] == "20"
    assert "kaboom" in body["error"]["message"]
    assert "SimulatedError" in body["error"]["message"]


def test_return_base64_includes_the_png_data(fleet: list[Sim], api_factory: Callable[..., JobApi]) -> None:
    api = api_factory(fleet)
    r = api.post(job(**{"return": "base64"}))
    data = base64.b64decode(r.json()["outputs"][0]["data"])
    assert data.startswith(b"\x89PNG")


def test_curl_style_form_encoded_json_is_accepted(fleet: list[Sim], api_factory: Callable[..., JobApi]) -> None:
    api = api_factory(fleet)
    r = api.client.post(
        "/jobs",
        data=json.dumps(json.loads(EXAMPLE.read_text())).encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["filename"].endswith(".png")


def test_input_images_are_uploaded_to_the_instance_before_the_prompt(
    fleet: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    api = api_factory(fleet)
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    wf = {
        "10": {"class_type": "LoadImage", "inputs": {"image": "in-test.png"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "up"}},
    }
    r = api.post(
        {
            "workflow": wf,
            "gpu": 3,
            "images": [{"name": "in-test.png", "image": base64.b64encode(png).decode()}],
        }
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "success"
    assert (fleet[3].dir / "input" / "in-test.png").read_bytes() == png


def test_post_jobs_needs_the_token_when_one_is_set(fleet: list[Sim], api_factory: Callable[..., JobApi]) -> None:
    api = api_factory(fleet, orchestrator_token="s3cret-token")
    r = api.post(job())
    assert r.status_code == 401
    assert "s3cret" not in r.text
    assert api.post(job(), headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = api.post(job(), headers={"Authorization": "Bearer s3cret-token"})
    assert r.status_code == 200
    assert r.json()["status"] == "success"
    assert api.client.get(f"/jobs/{r.json()['id']}").status_code == 200


def test_a_body_over_max_request_bytes_is_413_whether_declared_or_chunked(
    api_factory: Callable[..., JobApi],
) -> None:
    api = api_factory([], max_request_bytes="2000")
    big = json.dumps(job(padding="x" * 5000)).encode()
    r = api.client.post("/jobs", data=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_large"
    assert "MAX_REQUEST_BYTES" in r.json()["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the bytes themselves are counted
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    r = api.client.post("/jobs", data=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_large"
    small = api.post(job())  # under the limit: read and routed (no instance here)
    assert small.status_code == 503, small.text
    assert small.json()["error"] != "too_large"


def test_an_unknown_job_is_404(fleet: list[Sim], api_factory: Callable[..., JobApi]) -> None:
    api = api_factory(fleet)
    r = api.client.get("/jobs/nope")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


def test_metrics_count_jobs_and_pass_promtool(fleet: list[Sim], api_factory: Callable[..., JobApi]) -> None:
    api = api_factory(fleet)
    post_all(api, [job() for _ in range(3)])
    reg = api.registry
    assert reg.get_sample_value("comfyui_jobs_total", {"status": "success"}) == 3
    assert reg.get_sample_value("comfyui_jobs_total", {"status": "timeout"}) == 0
    assert reg.get_sample_value("comfyui_job_duration_seconds_count") == 3
    assert reg.get_sample_value("comfyui_job_duration_seconds_sum") > 1.0
    assert reg.get_sample_value("comfyui_job_queue_wait_seconds_count") == 3
    assert reg.get_sample_value("comfyui_instance_jobs_in_flight", {"gpu": "0", "instance": "comfyui_gpu0"}) == 0
    text = api.client.get("/metrics").text
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_openapi_schema_describes_the_job_request(fleet: list[Sim], api_factory: Callable[..., JobApi]) -> None:
    api = api_factory(fleet)
    schema = api.client.get("/openapi.json").json()
    post = schema["paths"]["/jobs"]["post"]
    assert set(post["responses"]) >= {"200", "202", "400", "401", "503"}
    props = schema["components"]["schemas"]["JobRequest"]["properties"]
    assert {"workflow", "overrides", "gpu", "timeout", "wait", "return", "prompt", "seed", "images"} <= set(props)


# ---------------------------------------------------------------- integration: failures
@pytest.fixture(scope="module")
def slow_sim(sim_tree: Path, tmp_path_factory: pytest.TempPathFactory, protocol: str) -> Iterator[Sim]:
    """A GPU 0 that takes 30 s per prompt; tests interrupt what they leave running."""
    (sim,) = start_sims(sim_tree, tmp_path_factory.mktemp("slow"), [30], protocol)
    yield sim
    sim.stop()


@pytest.fixture
def slow_and_fast(slow_sim: Sim, fleet: list[Sim]) -> Iterator[list[Sim]]:
    """GPU 0 slow (30 s per prompt), GPU 1 fast (the fleet's, 0.4 s)."""
    yield [slow_sim, fleet[1]]
    requests.post(f"{slow_sim.url}/queue", json={"clear": True}, timeout=5)
    requests.post(f"{slow_sim.url}/interrupt", json={}, timeout=5)
    wait_for(lambda: not slow_sim.queue()["queue_running"], timeout=10)


@pytest.fixture
def doomed_and_fast(sim_tree: Path, tmp_path: Path, fleet: list[Sim], protocol: str) -> Iterator[list[Sim]]:
    """Like slow_and_fast, with a GPU 0 of its own that the test may kill or hang."""
    (sim,) = start_sims(sim_tree, tmp_path, [30], protocol)
    yield [sim, fleet[1]]
    sim.stop()


def test_a_job_past_its_deadline_is_interrupted_and_the_instance_not_blamed_when_the_interrupt_takes(
    slow_and_fast: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    slow = slow_and_fast[0]
    api = api_factory(slow_and_fast, job_interrupt_grace="5")
    r = api.post(job(gpu=0, timeout=1.0))  # the prompt takes 30 s: "timeout" proves the deadline held
    body = r.json()
    assert body["status"] == "timeout"
    assert body["error"]["type"] == "timeout"
    assert "deadline while executing; interrupted" in body["error"]["message"]
    wait_for(lambda: api.manager.inflight().get(0, 0) == 0, timeout=15)  # the grace watch ended
    assert api.directory.hung == []
    # The simulator stopped executing it.
    wait_for(lambda: not slow.queue()["queue_running"], timeout=5)
    history = requests.get(f"{slow.url}/history/{body['prompt_id']}", timeout=5).json()[body["prompt_id"]]
    assert any(m[0] == "execution_interrupted" for m in history["status"]["messages"])
    assert api.registry.get_sample_value("comfyui_jobs_total", {"status": "timeout"}) == 1


def test_a_job_that_times_out_while_queued_is_removed_without_blaming_the_instance(
    slow_and_fast: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    slow = slow_and_fast[0]
    api = api_factory(slow_and_fast)
    blocker = api.post(job(gpu=0, wait=False)).json()["id"]
    wait_for(lambda: api.manager.get(blocker).status == "running")
    body = api.post(job(gpu=0, timeout=1.0)).json()
    assert body["status"] == "timeout"
    assert "while still queued; removed from the queue" in body["error"]["message"]
    assert api.directory.hung == []
    assert slow.queue()["queue_pending"] == []
    assert api.manager.get(blocker).status == "running"
    requests.post(f"{slow.url}/interrupt", json={}, timeout=5)
    assert api.client.get(f"/jobs/{blocker}", params={"wait": 5}).json()["error"]["type"] == "interrupted"


def test_an_instance_that_dies_fails_its_running_job_and_resubmits_its_queued_one(
    doomed_and_fast: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    slow, fast = doomed_and_fast
    api = api_factory(doomed_and_fast)
    api.directory.set_state(1, InstanceState.STARTING)  # everything goes to GPU 0 first
    running = api.post(job(wait=False)).json()["id"]
    queued = api.post(job(wait=False)).json()["id"]
    wait_for(lambda: len(slow.queue()["queue_pending"]) == 1 and api.manager.get(running).status == "running")
    api.directory.set_state(1, READY)
    slow.proc.kill()
    first = api.client.get(f"/jobs/{running}", params={"wait": 15}).json()
    second = api.client.get(f"/jobs/{queued}", params={"wait": 15}).json()
    assert first["status"] == "error"
    assert first["error"]["type"] == "instance"
    assert first["error"]["message"].startswith("comfyui_gpu0 (GPU 0) went away while running the job")
    assert second["status"] == "success", second
    assert second["instance"]["gpu"] == 1
    assert second["attempts"] == 2
    assert (fast.output / second["outputs"][0]["filename"]).is_file()


def test_a_running_job_reports_its_progress_per_node(
    slow_and_fast: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    api = api_factory(slow_and_fast)
    job_id = api.post(job(gpu=0, wait=False)).json()["id"]
    # The sampler takes most of the 30 s: the nodes before it finish (or are cached) first.
    body = wait_for(
        lambda: (b := api.client.get(f"/jobs/{job_id}").json())["status"] == "running"
        and (b.get("progress") or {}).get("nodes_done", 0) >= 4
        and b,
        timeout=15,
    )
    assert body["progress"]["nodes_total"] == 7
    assert body["progress"]["nodes_done"] < 7
    requests.post(f"{slow_and_fast[0].url}/interrupt", json={}, timeout=5)
    assert api.client.get(f"/jobs/{job_id}", params={"wait": 10}).json()["status"] == "error"


def test_an_instance_the_monitor_sees_restarting_fails_its_job(
    slow_and_fast: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    slow = slow_and_fast[0]
    api = api_factory(slow_and_fast)
    job_id = api.post(job(gpu=0, wait=False)).json()["id"]
    wait_for(lambda: api.manager.get(job_id).status == "running")
    api.directory.set_state(0, InstanceState.RESTARTING)
    result = api.client.get(f"/jobs/{job_id}", params={"wait": 10}).json()
    assert result["status"] == "error"
    assert result["error"]["message"] == "comfyui_gpu0 (GPU 0) is RESTARTING"
    requests.post(f"{slow.url}/interrupt", json={}, timeout=5)


def test_a_hung_instance_does_not_hang_the_job_past_its_deadline(
    doomed_and_fast: list[Sim], api_factory: Callable[..., JobApi]
) -> None:
    slow = doomed_and_fast[0]
    api = api_factory(doomed_and_fast, job_interrupt_grace="1")
    job_id = api.post(job(gpu=0, wait=False, timeout=2.0)).json()["id"]
    wait_for(lambda: api.manager.get(job_id).status == "running")
    # The simulator blocks its event loop: no events, no HTTP answers.
    (slow.dir / "user" / "simulator_faults.json").write_text(json.dumps({"hang_after": 0}))
    result = api.client.get(f"/jobs/{job_id}", params={"wait": 15}).json()
    assert result["status"] == "timeout"  # still "running" after 15 s had the 2 s deadline not held
    # Its interrupt cannot be confirmed (no answers): hung after JOB_INTERRUPT_GRACE.
    wait_for(lambda: api.directory.hung, timeout=15)
    assert [index for index, _ in api.directory.hung] == [0]
    r = api.post(job(timeout=5.0))  # the directory now says GPU 0 is UNHEALTHY
    assert r.json()["status"] == "success"
    assert r.json()["instance"]["gpu"] == 1


def test_a_deeply_nested_body_is_400_in_our_error_shape(api_factory: Callable[..., JobApi]) -> None:
    api = api_factory([])
    for depth in (65, 1_000, 10_000, 100_000):
        deep_object = '{"workflow": ' + '{"a": ' * depth + "1" + "}" * depth + ', "seed": 1}'
        deep_list = '{"workflow": {"1": {"class_type": "X", "inputs": {"a": ' + "[" * depth + "]" * depth + "}}}}"
        for body, ctype in ((deep_object, "application/json"), (deep_list, "application/x-www-form-urlencoded")):
            r = api.client.post("/jobs", data=body.encode(), headers={"Content-Type": ctype})
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "validation"
            assert "deeper than 64 levels" in r.json()["message"]
            assert "detail" not in r.json()
    shallow = '{"workflow": {"1": {"class_type": "X", "inputs": {"a": ' + "[" * 60 + "]" * 60 + "}}}}"
    r = api.client.post("/jobs", data=shallow.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code != 400 or "deeper" not in r.text, r.text
    broken = api.client.post("/jobs", data=b'{"workflow": [', headers={"Content-Type": "application/json"})
    assert broken.status_code == 400
    assert "not valid JSON" in broken.json()["message"]


# ---------------------------------------------------------------- the job journal (monitor restarts)
@pytest.fixture
def steady_sim(sim_tree: Path, tmp_path: Path) -> Iterator[Sim]:
    """One simulated instance, 1.5 s per prompt (a job is still running when its manager goes)."""
    sims = start_sims(sim_tree, tmp_path / "slow", [1.5])
    yield sims[0]
    sims[0].stop()


def final_answer(api: JobApi, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = api.client.get(f"/jobs/{job_id}", params={"wait": 1})
        assert r.status_code == 200, f"job {job_id} unknown after the restart: {r.text}"
        data = dict(r.json())
        return data if data["status"] in {"success", "error", "timeout"} else None

    return wait_for(done, 60, 0.1, what=f"job {job_id} final")


def test_a_job_in_flight_when_its_manager_stops_is_followed_by_the_next_one(
    steady_sim: Sim, tmp_path: Path
) -> None:
    journal = JobJournal(tmp_path / "journal")
    first = JobApi(make_settings(), FakeDirectory([steady_sim]), journal)
    try:
        done = first.post(job(wait=True)).json()
        assert done["status"] == "success"
        r = first.post(job(wait=False))
        assert r.status_code == 202, r.text
        running = r.json()["id"]
        wait_for(lambda: first.client.get(f"/jobs/{running}").json()["prompt_id"], 30, 0.05, what="prompt sent")
    finally:
        first.stop()  # what a SIGTERM or a crash of the monitor does to the manager
    record = json.loads(journal.path(running).read_text())
    assert record["response"]["status"] in {"queued", "running"}, "a stopped manager must not fail its jobs"
    assert journal.path(running).stat().st_mode & 0o777 == 0o600

    second = JobApi(make_settings(), FakeDirectory([steady_sim]), JobJournal(tmp_path / "journal"))
    try:
        again = final_answer(second, done["id"])
        assert again["outputs"] == done["outputs"]
        assert again["status"] == "success"
        followed = final_answer(second, running)
        assert followed["status"] == "success", followed
        assert followed["outputs"]
        assert followed["prompt_id"] == record["response"]["prompt_id"]
        assert followed["attempts"] == 1  # followed where it ran, not sent twice
        assert len(steady_sim.queue()["queue_pending"]) == 0
    finally:
        second.stop()


def test_an_accepted_job_never_sent_is_sent_once_an_instance_is_ready(steady_sim: Sim, tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "journal")
    directory = FakeDirectory([steady_sim])
    directory.set_state(0, InstanceState.STARTING)
    body = json.loads(json.dumps(job()))
    job_id = "a" * 32
    record = {
        "version": 1,
        "response": {"id": job_id, "status": "pending", "created_at": time.time(), "attempts": 0},
        "request": {"workflow": body["workflow"], "images": [], "return_mode": "filenames", "gpu": None,
                    "timeout": 60},
    }
    journal.path(job_id).parent.mkdir(parents=True)
    journal.path(job_id).write_text(json.dumps(record))
    api = JobApi(make_settings(), directory, journal)
    try:
        assert api.client.get(f"/jobs/{job_id}").json()["status"] == "pending"
        directory.set_state(0, READY)
        answer = final_answer(api, job_id)
        assert answer["status"] == "success", answer
        assert answer["outputs"], answer
        assert json.loads(journal.path(job_id).read_text())["response"]["status"] == "success"
    finally:
        api.stop()


def test_a_damaged_journal_record_is_set_aside_and_the_rest_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = JobJournal(tmp_path / "journal")
    journal.directory.mkdir()
    good = "b" * 32
    finished = {"id": good, "status": "success", "created_at": 100.0, "finished_at": 101.5, "attempts": 1,
                "outputs": [{"node_id": "9", "filename": "x.png"}], "queue_wait_seconds": 0.5}
    journal.path(good).write_text(json.dumps({"version": 1, "response": finished}))
    journal.path("c" * 32).write_bytes(b"\x80{ not json")
    journal.path("d" * 32).write_text(json.dumps({"version": 1, "response": {"id": "d" * 32, "status": "running",
                                                                          "created_at": 1.0, "attempts": 1}}))
    restored = journal.restore(now=1000.0, wall=200.0)
    assert [j.id for j in restored.finished] == [good]
    assert not restored.attached
    assert not restored.unsent
    job_ = restored.finished[0]
    assert job_.finished_mono == pytest.approx(901.5)
    assert job_.started_mono == pytest.approx(900.5)
    response = job_.to_response()
    assert response == JobResponse.model_validate(finished)  # served as it was answered before
    assert response.outputs[0].filename == "x.png"
    assert sorted(p.name for p in journal.directory.iterdir()) == sorted(
        [f"{good}.json", f"{'c' * 32}.json.damaged", f"{'d' * 32}.json.damaged"]
    )
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 2
    assert all("\n" not in line for line in lines)
    assert journal.ids() == {good}


def test_expired_results_leave_the_journal_too(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "journal")
    journal.directory.mkdir()
    old = {"id": "e" * 32, "status": "error", "created_at": 10.0, "finished_at": 11.0, "attempts": 1,
           "error": {"type": "instance", "message": "gone"}}
    journal.path("e" * 32).write_text(json.dumps({"version": 1, "response": old}))
    api = JobApi(make_settings(job_results_ttl="60"), FakeDirectory([]), journal)
    try:
        assert api.client.get(f"/jobs/{'e' * 32}").status_code == 404  # finished long before the TTL
        assert journal.ids() == set()
    finally:
        api.stop()
