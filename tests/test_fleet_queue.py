"""The fleet's Redis job queue against a real redis-server: backpressure, leases, reclaim, retries,
the dead-letter stream, one result per job id, heartbeats and `fleet status`.

The machine behind the worker is a small job API (``/scaling`` and ``POST /jobs``) whose answers
each test sets, so that a failing machine, a slow job or a full machine is a value; the whole path
through real machines (``up``, supervisord, the monitor, the simulator) is
``tests/reliability/test_fleet_chaos.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from support import REDIS_SERVER, RedisServer, ServedApp, clean_env, free_port, txt2img, wait_for, wait_until

from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.plan import build_plan
from orchestrator.core.settings import load_settings
from orchestrator.fleet import client as fleet_client
from orchestrator.fleet import queue
from orchestrator.fleet.capacity import Capacity, capacity_from_scaling, fleet_status, free_slots, heartbeat
from orchestrator.fleet.queue import QueueError, connect
from orchestrator.fleet.worker import QueueWorker, WorkerConfig
from orchestrator.lifecycle.launch import extra_programs, program_envs

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)")
BODY = {"workflow": txt2img("fleet")}


# ---------------------------------------------------------------- a machine's job API, scripted
class FakeMachine:
    """``GET /scaling`` with ``ready`` READY instances; ``POST /jobs`` answers ``answer(n)`` after
    ``delay`` seconds (n: the call's number). Records calls and the most jobs running at once."""

    def __init__(self, ready: int = 1, delay: float = 0.05) -> None:
        self.ready, self.delay = ready, delay
        self.calls: list[dict[str, Any]] = []
        self.running = self.peak = 0
        self.answer: Callable[[int, dict[str, Any]], tuple[int, dict[str, Any]]] = self.success
        app = FastAPI()

        @app.get("/scaling")
        async def scaling() -> dict[str, Any]:  # the fields the worker reads (core.scaling.MachineLoad)
            return {"ready_instances": self.ready, "instances": max(1, self.ready), "draining": False}

        @app.post("/jobs")
        async def jobs(request: Request) -> JSONResponse:
            body = await request.json()
            self.calls.append(body)
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                await asyncio.sleep(self.delay)
                code, answer = self.answer(len(self.calls), body)
            finally:
                self.running -= 1
            return JSONResponse(answer, status_code=code)

        self.server = ServedApp(app)
        self.url = self.server.url

    @staticmethod
    def success(n: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"id": f"local-{n}", "status": "success", "outputs": [{"node_id": "9", "filename": f"f{n}.png"}]}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def fake() -> Iterator[FakeMachine]:
    m = FakeMachine()
    yield m
    m.server.stop()


@pytest.fixture
def run_worker(rds: redis.Redis) -> Iterator[Callable[..., QueueWorker]]:
    """run_worker(url, machine_id=..., **config) → a QueueWorker serving in a thread until the test ends."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(api_url: str, machine_id: str = "m1", **values: Any) -> QueueWorker:
        config = WorkerConfig(machine_id=machine_id, api_url=api_url, **{"lease": 2.0, "heartbeat_ttl": 3.0, **values})
        worker = QueueWorker(rds, config)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop, 5.0), daemon=True)
        thread.start()
        running.append((stop, thread))
        return worker

    yield start
    for stop, _ in running:
        stop.set()
    for _, thread in running:
        thread.join(15)


def results(client: redis.Redis, ids: list[str], timeout: float = 30) -> list[dict[str, Any]]:
    return [wait_for(lambda i=i: fleet_client.result(client, i), timeout, 0.05, f"result of {i}") for i in ids]


# ---------------------------------------------------------------- values and connecting
def test_free_slots_are_ready_instances_less_jobs_in_flight_and_none_without_a_monitor() -> None:
    assert free_slots(Capacity(gpus=4, ready=3, monitor_up=True), inflight=1) == 2
    assert free_slots(Capacity(gpus=4, ready=3, monitor_up=True), inflight=5) == 0
    assert free_slots(Capacity(gpus=4, ready=0, monitor_up=True), inflight=0) == 0
    assert free_slots(Capacity(gpus=4, ready=4, monitor_up=False), inflight=0) == 0
    # From the monitor's /scaling: its READY count, none while the machine drains for shutdown.
    assert capacity_from_scaling({"ready_instances": 2, "instances": 3, "draining": False}) == Capacity(3, 2, True)
    assert capacity_from_scaling({"ready_instances": 2, "instances": 3, "draining": True}).ready == 0
    assert free_slots(Capacity(gpus=2, ready=2, monitor_up=True), inflight=1, per_instance=3) == 5


def test_a_bad_queue_url_is_one_line_that_never_shows_the_password(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="invalid JOB_QUEUE_URL: expected redis://") as bad:
        connect("http://:hunter22@example:6379")
    assert "hunter22" not in str(bad.value)
    with pytest.raises(ConfigError, match="JOB_QUEUE_URL is not set"):
        connect("")
    closed = redis_url.rsplit(":", 1)[0] + ":1/0"
    with pytest.raises(QueueError, match="does not answer") as down:
        connect(closed.replace("redis://", "redis://:hunter22@"))
    assert "hunter22" not in str(down.value)


def test_the_client_refuses_an_invalid_job_before_queueing_it(rds: redis.Redis) -> None:
    with pytest.raises(ConfigError, match="invalid job: workflow"):
        fleet_client.submit(rds, {"prompt": "no workflow"}, timeout=1)
    assert not rds.exists(queue.STREAM)


# ---------------------------------------------------------------- running jobs
def test_a_submitted_job_runs_once_on_the_machine_and_its_result_comes_back(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    run_worker(fake.url)
    result = fleet_client.submit(rds, BODY, timeout=30)
    assert result is not None
    assert (result["status"], result["machine"], result["attempt"]) == ("success", "m1", 1)
    assert result["job"]["outputs"][0]["filename"] == "f1.png"
    assert len(fake.calls) == 1
    assert fake.calls[0]["wait"] is True
    assert fake.calls[0]["workflow"] == BODY["workflow"]
    assert rds.get(queue.completions_key(result["id"])) == "1"
    assert rds.xlen(queue.STREAM) == 0  # acknowledged and dropped


def test_backpressure_the_worker_holds_no_more_jobs_than_ready_instances(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    fake.ready, fake.delay = 2, 0.4
    ids = [fleet_client.enqueue(rds, BODY) for _ in range(6)]
    run_worker(fake.url)
    wait_for(lambda: fake.running == 2, 20, 0.02, "two jobs running")
    status = fleet_status(rds)
    assert (status.leased, status.waiting) == (2, 4)  # the rest stays in the queue for other machines
    assert all(r["status"] == "success" for r in results(rds, ids))
    assert fake.peak == 2
    assert len(fake.calls) == 6


def test_a_machine_with_nothing_ready_takes_no_job(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    fake.ready = 0
    job = fleet_client.enqueue(rds, BODY)
    worker = run_worker(fake.url)
    wait_for(lambda: fleet_status(rds).machines, 20, 0.05, "the worker's heartbeat")
    assert fleet_status(rds).machines[0]["free_slots"] == 0
    assert not fleet_client.wait_result(rds, job, 1.5)
    assert fake.calls == []
    assert fleet_status(rds).waiting == 1
    fake.ready = 1
    worker.refresh()
    assert results(rds, [job])[0]["status"] == "success"


def test_a_redelivered_job_that_already_has_a_result_is_acknowledged_without_running(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    run_worker(fake.url)
    first = fleet_client.submit(rds, BODY, timeout=30, job_id="same-id")
    fleet_client.enqueue(rds, BODY, job_id="same-id")  # delivered again (a client retry, a reclaim)
    wait_for(lambda: rds.xlen(queue.STREAM) == 0, 20, 0.05, "the duplicate acknowledged")
    assert len(fake.calls) == 1
    assert fleet_client.result(rds, "same-id") == first
    assert rds.get(queue.completions_key("same-id")) == "1"


def test_a_dead_workers_job_is_reclaimed_after_the_lease_and_finished_elsewhere(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    queue.ensure_group(rds)
    job = fleet_client.enqueue(rds, BODY)
    # A worker that read the job and died: the entry is pending on its consumer, never renewed.
    taken = rds.xreadgroup(queue.GROUP, "dead-machine:1", {queue.STREAM: ">"}, count=1)
    assert taken
    assert taken[0][1][0][1]["id"] == job
    run_worker(fake.url, machine_id="m2", lease=1.0)
    result = results(rds, [job])[0]
    assert (result["status"], result["machine"], result["attempt"]) == ("success", "m2", 2)
    assert len(fake.calls) == 1


def test_a_job_longer_than_the_lease_keeps_it_while_its_worker_renews(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    fake.delay = 3.0
    other = FakeMachine(ready=1)
    try:
        run_worker(fake.url, machine_id="slow", lease=1.0)
        job = fleet_client.enqueue(rds, BODY)
        wait_for(lambda: fake.running == 1, 20, 0.02, "the job running on the slow machine")
        run_worker(other.url, machine_id="idle", lease=1.0)  # free, reclaiming every 0.25 s
        result = results(rds, [job])[0]
        assert (result["machine"], result["attempt"]) == ("slow", 1)
        assert other.calls == []
        assert rds.get(queue.completions_key(job)) == "1"
    finally:
        other.server.stop()


def test_a_failing_machine_is_retried_then_the_job_is_dead_lettered_with_its_last_error(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    def failing(n: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"id": f"l{n}", "status": "error", "error": {"type": "instance", "message": f"gpu lost #{n}"}}

    fake.answer = failing
    run_worker(fake.url, lease=0.5, max_attempts=2)
    result = fleet_client.submit(rds, BODY, timeout=40)
    assert result is not None
    assert result["status"] == "failed"
    assert result["error"]["type"] == "dead_letter"
    assert "gave up after 2 attempt(s): instance error: gpu lost #2" in result["error"]["message"]
    assert len(fake.calls) == 2
    dead = rds.xrange(queue.DEAD_STREAM)
    assert len(dead) == 1
    assert dead[0][1]["id"] == result["id"]
    assert dead[0][1]["attempts"] == "2"
    assert dead[0][1]["error"] == "instance error: gpu lost #2"
    assert json.loads(dead[0][1]["body"])["workflow"] == BODY["workflow"]
    assert rds.xlen(queue.STREAM) == 0


def test_the_workflows_own_errors_are_results_not_retries(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    def invalid(n: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 400, {"error": "validation", "message": "3.seed: Value -1 smaller than min of 0", "node_id": "3"}

    fake.answer = invalid
    run_worker(fake.url, lease=0.5)
    result = fleet_client.submit(rds, BODY, timeout=30)
    assert result is not None
    assert result["status"] == "error"
    assert result["error"] == {
        "type": "validation", "message": "3.seed: Value -1 smaller than min of 0", "node_id": "3",
    }
    assert len(fake.calls) == 1
    assert not rds.exists(queue.DEAD_STREAM)


def test_a_worker_started_before_redis_waits_for_it_instead_of_exiting(tmp_path: Path, fake: FakeMachine) -> None:
    port = free_port()
    client = connect(f"redis://127.0.0.1:{port}/0", ping=False)
    worker = QueueWorker(client, WorkerConfig(machine_id="early", api_url=fake.url, lease=2.0, heartbeat_ttl=3.0))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, 5.0), daemon=True)
    thread.start()
    try:
        assert not wait_until(lambda: not thread.is_alive(), 1.5)  # still trying, not crashed
        with RedisServer(tmp_path / "late-redis", port) as server:
            rds = connect(server.url)
            wait_for(lambda: [m["machine_id"] for m in fleet_status(rds).machines] == ["early"], 60, 0.1, "its beat")
            result = fleet_client.submit(rds, BODY, timeout=30)
            assert result is not None
            assert result["status"] == "success"
            stop.set()
            thread.join(15)
            assert not fleet_status(rds).machines  # a clean stop removes its heartbeat
    finally:
        stop.set()
        thread.join(15)


# ---------------------------------------------------------------- heartbeats and fleet status
def test_fleet_status_lists_live_machines_and_drops_one_whose_heartbeat_expired(
    rds: redis.Redis, fake: FakeMachine, run_worker: Callable[..., QueueWorker]
) -> None:
    fake.ready = 3
    run_worker(fake.url, machine_id="alive", gpus=3)
    heartbeat(rds, "gone", {"machine_id": "gone", "gpus": 1, "free_slots": 1, "updated_at": 0}, ttl=0.5)
    ids = wait_for(
        lambda: [m["machine_id"] for m in fleet_status(rds).machines] == ["alive", "gone"], 10, 0.02, "both machines"
    )
    assert ids
    alive = wait_for(lambda: [m for m in fleet_status(rds).machines if m.get("ready_instances") == 3], 10, 0.1, "beat")
    assert (alive[0]["gpus"], alive[0]["free_slots"], alive[0]["monitor"]) == (3, 3, "up")
    wait_for(lambda: [m["machine_id"] for m in fleet_status(rds).machines] == ["alive"], 10, 0.1, "gone expired")


def test_the_cli_prints_fleet_status_and_submit_refuses_bad_input(
    rds: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    heartbeat(rds, "m7", {"machine_id": "m7", "gpus": 2, "ready_instances": 2, "free_slots": 1,
                          "jobs_running": 1, "monitor": "up", "updated_at": 0}, ttl=30)
    env = clean_env(ROOT=str(tmp_path / "root"), JOB_QUEUE_URL=redis_url)
    cli = [sys.executable, "-m", "orchestrator"]
    out = subprocess.run([*cli, "fleet", "status"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[:5] == ["MACHINE", "GPUS", "READY", "FREE", "RUNNING"]
    assert row.split()[:5] == ["m7", "2", "2", "1", "1"]
    as_json = json.loads(subprocess.run([*cli, "fleet", "status", "--json"], env=env, capture_output=True,
                                        text=True, timeout=60, check=True).stdout)
    assert as_json["machines"][0]["free_slots"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"workflow": {"1": {"inputs": {}}}, "colour": "red"}')
    out = subprocess.run([*cli, "submit", str(bad)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: invalid job:")
    assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([*cli, "fleet", "status", "--queue", "nope://x"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: invalid JOB_QUEUE_URL: expected redis://[:password@]host:port/db, rediss://… or unix://…"
    )


def test_the_worker_and_submit_commands_run_a_job_and_the_worker_stops_cleanly_on_sigterm(
    rds: redis.Redis, redis_url: str, fake: FakeMachine, tmp_path: Path
) -> None:
    env = clean_env(ROOT=str(tmp_path / "root"), ORCHESTRATOR_PORT=str(fake.server.port), MACHINE_ID="cli-m",
                    JOB_QUEUE_URL=redis_url)
    cli = [sys.executable, "-m", "orchestrator"]
    worker = subprocess.Popen([*cli, "worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: [m["machine_id"] for m in fleet_status(rds).machines] == ["cli-m"], 60, 0.1, "its beat")
        job = tmp_path / "job.json"
        job.write_text(json.dumps(BODY["workflow"]))  # a bare workflow in API format
        out = subprocess.run([*cli, "submit", str(job), "--json", "--timeout", "60"], env=env, capture_output=True,
                             text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert (result["status"], result["machine"]) == ("success", "cli-m")
        assert fake.calls[0]["workflow"] == BODY["workflow"]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert fleet_status(rds).machines == ()
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(10)
        assert worker.stdout is not None
        log = worker.stdout.read().decode()
    assert redis_url not in log


# ---------------------------------------------------------------- the supervisord program
def test_the_worker_program_exists_only_with_a_queue_and_gets_the_url_from_its_private_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "redis://:s3cret-pass@10.0.0.5:6379/0"
    monkeypatch.setenv("JOB_QUEUE_URL", url)
    monkeypatch.setenv("HF_TOKEN", "hf_should_not_reach_the_worker")
    settings = load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1", "JOB_QUEUE_URL": url})
    layout = Layout(tmp_path)
    plan = build_plan(settings, [])
    envs = program_envs(settings)
    programs = {p.name: p for p in extra_programs(settings, layout, plan, envs=envs)}
    worker = programs["queue"]
    assert worker.argv[-1] == "worker"
    assert all(url not in a for a in worker.argv)
    assert url not in json.dumps(worker.env)
    assert envs["queue"]["JOB_QUEUE_URL"] == url
    assert "HF_TOKEN" not in envs["queue"]
    assert "JOB_QUEUE_URL" not in envs["monitor"]
    assert "JOB_QUEUE_URL" not in envs["models"]
    plain = load_settings({"ROOT": str(tmp_path), "MOCK_GPU": "1"})
    assert "queue" not in {p.name for p in extra_programs(plain, layout, plan, envs=program_envs(plain))}


def test_env_files_are_private(tmp_path: Path) -> None:
    """The queue's env file is written like the others' (0600); guarded here since it holds a password."""
    from orchestrator.lifecycle.launch import env_file, write_env_files

    layout = Layout(tmp_path)
    write_env_files(layout, {"queue": {"JOB_QUEUE_URL": "redis://:pw@h:1/0"}})
    mode = stat.S_IMODE(os.stat(env_file(layout, "queue")).st_mode)
    assert mode == 0o600
