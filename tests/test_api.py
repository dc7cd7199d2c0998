"""The control API over real HTTP semantics (FastAPI TestClient) with a fake control plane."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Gauge
from starlette.types import Receive, Scope, Send

from orchestrator.core.errors import ConfigError
from orchestrator.core.gpus import Gpu, GpuSample
from orchestrator.core.readiness import GpuStatus, InstanceStatus, Liveness, Readiness, readiness
from orchestrator.core.settings import Settings, load_settings
from orchestrator.core.states import InstanceState
from orchestrator.monitor.api import ProbeFastPath, create_app, with_fast_probes
from orchestrator.monitor.app import run_loop, uvicorn_config
from orchestrator.monitor.preflight import check_listen, is_loopback

TOKEN = "s3cret-token-value"


def status(gpu: int, state: InstanceState = InstanceState.READY, reason: str = "answering") -> InstanceStatus:
    return InstanceStatus(
        gpu=gpu, name=f"comfyui_gpu{gpu}", port=8188 + gpu, state=state, reason=reason, since=1.0,
        process_state="RUNNING", pid=100 + gpu, start_time=1_700_000_000.0, uptime=12.3456, restarts=1,
        failed_custom_nodes=("ComfyUI-Broken",) if gpu == 1 else (), queue_pending=2, queue_running=1,
        last_probe=2.0, probe_duration=0.01, device="cpu",
    )


class FakeControl:
    def __init__(self) -> None:
        self.statuses = [status(0), status(1)]
        self.alive = Liveness(True, True, 0.2, "ok")
        self.restarts: list[tuple[int, str]] = []
        gpu = Gpu(0, "GPU-aaaa", "00000000:01:00.0", "Mock GPU (CPU)", 2**34, "mock", mock=True)
        self.gpus = [GpuStatus(gpu, GpuSample(0, "GPU-aaaa", utilization=5.0, memory_used=2**30), 3.0)]

    def liveness(self) -> Liveness:
        return self.alive

    def readiness(self) -> Readiness:
        return readiness(self.statuses, None)

    def instance_statuses(self) -> list[InstanceStatus]:
        return self.statuses

    def instance_status(self, gpu: int) -> InstanceStatus:
        for s in self.statuses:
            if s.gpu == gpu:
                return s
        raise KeyError(f"no instance on GPU {gpu} (this machine runs GPUs 0, 1)")

    def gpu_statuses(self) -> list[GpuStatus]:
        return self.gpus

    def request_restart(self, gpu: int, reason: str) -> InstanceStatus:
        s = self.instance_status(gpu)
        self.restarts.append((gpu, reason))
        return s


def make_client(
    tmp_path: Path, token: str = "", routers: list[APIRouter] | None = None
) -> tuple[TestClient, FakeControl]:
    settings = load_settings({"ROOT": str(tmp_path), "ORCHESTRATOR_TOKEN": token})
    control = FakeControl()
    registry = CollectorRegistry(auto_describe=False)
    Gauge("comfyui_instance_up", "up", ["gpu"], registry=registry).labels("0").set(1)
    app = create_app(control, settings, registry, routers=routers or [])
    return TestClient(app), control


def test_healthz_and_its_alias_answer_200_when_alive_and_503_when_supervisord_is_gone(tmp_path: Path) -> None:
    client, control = make_client(tmp_path)
    for path in ("/healthz", "/health"):
        r = client.get(path)
        assert r.status_code == 200
        assert r.json()["alive"] is True
    control.alive = Liveness(False, False, 9.0, "supervisord does not answer")
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["reason"] == "supervisord does not answer"


def test_readyz_is_200_when_all_are_ready_and_503_naming_the_instance_that_is_not(tmp_path: Path) -> None:
    client, control = make_client(tmp_path)
    assert client.get("/readyz").status_code == 200
    control.statuses[1] = status(1, InstanceState.UNHEALTHY, "3 consecutive failed probes (last: no answer)")
    for path in ("/readyz", "/ready"):
        r = client.get(path)
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False
        assert "comfyui_gpu1 UNHEALTHY" in body["reason"]
        assert {"gpu": 1, "name": "comfyui_gpu1", "state": "UNHEALTHY",
                "reason": "3 consecutive failed probes (last: no answer)"} in body["instances"]


def test_instances_list_state_reason_pid_port_uptime_restarts_nodes_and_queue(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    body = client.get("/instances").json()
    one = body["instances"][1]
    assert one["gpu"] == 1
    assert one["name"] == "comfyui_gpu1"
    assert one["port"] == 8189
    assert one["state"] == "READY"
    assert one["pid"] == 101
    assert one["uptime_seconds"] == 12.346
    assert one["restarts"] == 1
    assert one["failed_custom_nodes"] == ["ComfyUI-Broken"]
    assert (one["queue_pending"], one["queue_running"], one["queue_depth"]) == (2, 1, 3)
    assert client.get("/instances/1").json() == one


def test_an_unknown_gpu_is_404_with_a_message(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    r = client.get("/instances/7")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    assert "no instance on GPU 7" in r.json()["message"]
    r = client.get("/instances/x")
    assert r.status_code == 400
    assert r.json()["error"] == "validation"
    assert "gpu" in r.json()["message"]


def test_restart_needs_the_bearer_token_when_one_is_set(tmp_path: Path) -> None:
    client, control = make_client(tmp_path, token=TOKEN)
    r = client.post("/instances/0/restart")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "unauthorized"
    assert client.post("/instances/0/restart", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/instances/0/restart", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert control.restarts == []
    r = client.post("/instances/0/restart", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202
    assert r.json() == {"gpu": 0, "name": "comfyui_gpu0", "accepted": True, "state": "READY"}
    assert control.restarts == [(0, "restart requested over HTTP")]
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/instances/9/restart", headers=good).status_code == 404


def test_restart_without_a_configured_token_is_open_on_loopback(tmp_path: Path) -> None:
    client, control = make_client(tmp_path)
    assert client.post("/instances/1/restart").status_code == 202
    assert control.restarts == [(1, "restart requested over HTTP")]


def test_read_endpoints_do_not_need_the_token(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path, token=TOKEN)
    for path in ("/healthz", "/readyz", "/instances", "/instances/0", "/gpus", "/status", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_secrets_never_appear_in_reasons(tmp_path: Path) -> None:
    client, control = make_client(tmp_path, token=TOKEN)
    control.statuses[0] = status(0, InstanceState.STARTING, f"traceback: ValueError: bad token {TOKEN}")
    for path in ("/instances", "/readyz", "/status"):
        assert TOKEN not in client.get(path).text


def test_gpus_list_the_latest_sample_and_missing_fields_as_null(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    gpu = client.get("/gpus").json()["gpus"][0]
    assert gpu["uuid"] == "GPU-aaaa"
    assert gpu["utilization_percent"] == 5.0
    assert gpu["memory_used_bytes"] == 2**30
    assert gpu["power_watts"] is None
    assert gpu["sampled_at"] == 3.0


def test_status_combines_readiness_instances_and_gpus(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    body = client.get("/status").json()
    assert body["ready"] is True
    assert len(body["instances"]) == 2
    assert len(body["gpus"]) == 1


def test_metrics_serves_the_registry_in_prometheus_text_format(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'comfyui_instance_up{gpu="0"} 1.0' in r.text


def test_the_openapi_schema_lists_every_endpoint_and_extra_routers(tmp_path: Path) -> None:
    router = APIRouter()

    @router.get("/jobs/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    client, _ = make_client(tmp_path, routers=[router])
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/healthz", "/health", "/readyz", "/ready", "/instances", "/instances/{gpu}",
                 "/instances/{gpu}/restart", "/gpus", "/metrics", "/status", "/jobs/ping"):
        assert path in paths, path
    assert client.get("/jobs/ping").json() == {"pong": "yes"}


PROBES = ("/healthz", "/health", "/readyz", "/ready", "/metrics")


def test_the_probe_fast_path_answers_exactly_like_the_fastapi_routes(tmp_path: Path) -> None:
    client, control = make_client(tmp_path)
    fast = TestClient(with_fast_probes(client.app))  # type: ignore[arg-type]
    for _ in ("all well", "supervisord gone, an instance unhealthy"):
        for path in PROBES:
            slow_r, fast_r = client.get(path), fast.get(path)
            assert (fast_r.status_code, fast_r.content) == (slow_r.status_code, slow_r.content), path
            assert fast_r.headers == slow_r.headers, path
        control.alive = Liveness(False, False, 9.0, "supervisord does not answer")
        control.statuses[1] = status(1, InstanceState.UNHEALTHY, "3 consecutive failed probes")
    assert fast.get("/healthz").status_code == 503
    assert fast.get("/readyz").json()["ready"] is False
    assert fast.get("/metrics").headers["content-type"] == client.get("/metrics").headers["content-type"]


def test_the_fast_path_answers_probe_gets_itself_and_passes_everything_else_on(tmp_path: Path) -> None:
    app = make_client(tmp_path, TOKEN)[0].app
    seen: list[tuple[str, str, str]] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["type"], scope.get("method", ""), scope.get("path", "")))
        await app(scope, receive, send)  # type: ignore[operator]

    with TestClient(ProbeFastPath(spy, app.state.probes)) as fast:  # type: ignore[attr-defined]
        for path in PROBES:
            assert fast.get(path, params={"x": "1"}).status_code == 200
        assert ("lifespan", "", "") in seen
        assert not [s for s in seen if s[0] == "http"]  # no probe reached FastAPI
        assert fast.get("/instances").status_code == 200
        assert fast.post("/healthz").status_code == 405  # FastAPI's answer for the wrong method
        assert fast.post("/instances/0/restart").status_code == 401  # the token is still required
        assert fast.get("/healthz/").status_code == 200  # FastAPI redirects, the fast path answers
        assert "/metrics" in fast.get("/openapi.json").json()["paths"]
    assert [s[1:] for s in seen if s[0] == "http"] == [
        ("GET", "/instances"), ("POST", "/healthz"), ("POST", "/instances/0/restart"), ("GET", "/healthz/"),
        ("GET", "/openapi.json"),
    ]


def test_the_monitor_is_served_by_httptools_on_uvloop_by_default() -> None:
    import uvloop

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("not served here")

    assert uvicorn_config(app).http == "httptools"
    loops: list[type] = []

    async def which() -> None:
        loops.append(type(asyncio.get_running_loop()))

    run_loop(which())
    run_loop(which(), uvloop=False)
    assert loops[0] is uvloop.Loop
    assert loops[1] is not uvloop.Loop


def _settings(listen: str, token: str = "") -> Settings:
    return load_settings({"ORCHESTRATOR_LISTEN": listen, "ORCHESTRATOR_TOKEN": token})


@pytest.mark.parametrize("listen", ["0.0.0.0", "::", "10.1.2.3", "worker.example.com"])
def test_listening_beyond_loopback_without_a_token_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match="set ORCHESTRATOR_TOKEN") as err:
        check_listen(_settings(listen))
    assert f"ORCHESTRATOR_LISTEN={listen}" in str(err.value)
    assert "\n" not in str(err.value)
    check_listen(_settings(listen, TOKEN))


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses_need_no_token(listen: str) -> None:
    assert is_loopback(listen)
    check_listen(_settings(listen))
