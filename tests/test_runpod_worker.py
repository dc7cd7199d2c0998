"""The RunPod serverless handler over the local job API."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import requests.adapters
from prometheus_client import CollectorRegistry
from support import ComfyServer, ServedApp, free_port, jobs_app

from orchestrator.cli.jobs import cmd_runpod_worker
from orchestrator.core.errors import ConfigError
from orchestrator.core.instances import InstanceView
from orchestrator.core.settings import Settings, load_settings
from orchestrator.core.states import InstanceState
from orchestrator.jobs.runpod import (
    InputError,
    instance_count,
    job_api_url,
    make_handler,
    to_job_request,
    to_output,
)
from orchestrator.jobs.tracker import JobManager

REPO = Path(__file__).resolve().parents[1]
needs_runpod = pytest.mark.skipif(
    importlib.util.find_spec("runpod") is None, reason="the runpod extra is not installed"
)
WORKFLOW = json.loads((REPO / "examples" / "workflow.json").read_text())["workflow"]
PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def seed_003_input(seed: int) -> dict[str, Any]:
    """The serverless seed's input: workflow plus the prompt/seed/size shorthand."""
    return {
        "workflow": WORKFLOW,
        "prompt": "A beautiful sunset over mountains",
        "seed": seed,
        "width": 768,
        "height": 512,
    }


def seed_004_input(text: str) -> dict[str, Any]:
    """The other worker's input: workflow plus dot-path overrides."""
    return {"workflow": WORKFLOW, "overrides": [{"node_id": "6", "field": "inputs.text", "value": text}]}


def settings_for(port: int = 9090, **values: str) -> Settings:
    return load_settings(
        {
            "ROOT": "/nonexistent-root",
            "ORCHESTRATOR_PORT": str(port),
            **{k.upper(): v for k, v in values.items()},
        }
    )


# ---------------------------------------------------------------- mapping (pure)
def test_the_serverless_input_becomes_a_waiting_job_request_with_base64_images() -> None:
    body = to_job_request(seed_003_input(12345))
    assert body["wait"] is True
    assert body["return"] == "base64"
    assert (body["prompt"], body["seed"], body["width"], body["height"]) == (
        "A beautiful sunset over mountains",
        12345,
        768,
        512,
    )
    assert to_job_request({**seed_004_input("x"), "return": "filenames"})["return"] == "filenames"


@pytest.mark.parametrize(
    ("inp", "needle"),
    [
        (None, "expected an object"),
        ({"prompt": "x"}, "input.workflow: missing"),
        ({"workflow": {}, "webhook_url": "x"}, "unknown key(s) webhook_url"),
    ],
)
def test_malformed_serverless_input_is_refused(inp: Any, needle: str) -> None:
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        to_job_request(inp)


def test_a_successful_job_maps_onto_the_seeds_output_shape() -> None:
    body = {
        "id": "j1",
        "status": "success",
        "prompt_id": "p1",
        "instance": {"gpu": 1, "name": "g", "port": 1},
        "execution_time_seconds": 12.5,
        "outputs": [
            {
                "node_id": "9",
                "filename": "ComfyUI_00001_.png",
                "subfolder": "",
                "type": "output",
                "data": "QUJD",
            },
            {"node_id": "12", "filename": "preview.png", "subfolder": "", "type": "temp", "data": "REVG"},
        ],
    }
    assert to_output(200, body, 13.0) == {
        "status": "success",
        "images": ["QUJD"],
        "filenames": ["ComfyUI_00001_.png"],
        "execution_time_seconds": 12.5,
        "prompt_id": "p1",
        "job_id": "j1",
        "gpu": 1,
    }


def test_uploaded_outputs_answer_with_their_urls() -> None:
    body = {
        "id": "j2", "status": "success", "instance": {"gpu": 0},
        "outputs": [
            {"node_id": "9", "filename": "a.png", "type": "output", "url": "https://s3.example/a.png"},
            {"node_id": "9", "filename": "b.png", "type": "output", "url": None, "upload_error": "failed 4 times"},
        ],
    }
    out = to_output(200, body, 2.0)
    assert out["urls"] == ["https://s3.example/a.png", None]
    assert out["filenames"] == ["a.png", "b.png"]
    assert "urls" not in to_output(200, {**body, "outputs": [{"filename": "c.png", "type": "output"}]}, 1.0)


@pytest.mark.parametrize(
    ("status_code", "body", "kind"),
    [
        (400, {"error": "validation", "message": "node 66 is not in the workflow"}, "validation"),
        (200, {"status": "error", "error": {"type": "validation", "message": "bad seed"}}, "validation"),
        (200, {"status": "timeout", "error": {"type": "timeout", "message": "ran past"}}, "timeout"),
        (200, {"status": "error", "error": {"type": "execution", "message": "node 9 failed"}}, "internal"),
        (503, {"error": "no_instance", "message": "no READY instance"}, "internal"),
        (500, "oops", "internal"),
    ],
)
def test_failures_map_onto_the_seeds_error_types(status_code: int, body: Any, kind: str) -> None:
    out = to_output(status_code, body, 0.25)
    assert out["status"] == "error"
    assert out["error_type"] == kind
    assert out["error"]
    assert out["execution_time_seconds"] == 0.25


def test_the_job_api_address_follows_the_monitor_settings() -> None:
    assert job_api_url(settings_for(9191)) == "http://127.0.0.1:9191"
    assert job_api_url(settings_for(9191, orchestrator_listen="0.0.0.0")) == "http://127.0.0.1:9191"
    assert job_api_url(settings_for(9191, orchestrator_listen="10.1.2.3")) == "http://10.1.2.3:9191"
    assert job_api_url(settings_for(9191, orchestrator_listen="::1")) == "http://[::1]:9191"


def test_concurrency_is_the_number_of_planned_instances(tmp_path: Path) -> None:
    settings = settings_for(root=str(tmp_path))
    assert instance_count(settings) == 1
    plan = tmp_path / ".orchestrator" / "plan.json"
    plan.parent.mkdir(parents=True)
    plan.write_text(json.dumps({"instances": [{}, {}, {}]}))
    assert instance_count(settings) == 3


class MockAdapter(requests.adapters.BaseAdapter):
    """A requests transport that answers with ``respond(request)`` (or raises what it raises)."""

    def __init__(self, respond: Any) -> None:
        super().__init__()
        self.respond = respond

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        return self.respond(request)

    def close(self) -> None:
        pass


def mock_session(respond: Any) -> requests.Session:
    session = requests.Session()
    session.mount("http://", MockAdapter(respond))
    return session


def answer(request: requests.PreparedRequest, status: int, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = json.dumps(body).encode()
    resp.headers.update({"content-type": "application/json", **(headers or {})})
    resp.request = request
    return resp


def test_a_busy_machine_is_retried_until_it_takes_the_job() -> None:
    calls: list[str] = []

    def respond(request: requests.PreparedRequest) -> requests.Response:
        calls.append(request.headers.get("authorization", ""))
        if len(calls) < 3:
            return answer(request, 503, {"error": "saturated", "message": "busy"}, {"Retry-After": "0"})
        return answer(
            request, 200, {"status": "success", "prompt_id": "p", "outputs": [], "execution_time_seconds": 1.0}
        )

    handler = make_handler(settings_for(orchestrator_token="tok-123"), session=mock_session(respond))
    out = asyncio.run(handler({"input": seed_004_input("x")}))
    assert out["status"] == "success"
    assert calls == ["Bearer tok-123"] * 3


def test_an_unreachable_job_api_is_an_internal_error_after_the_wait() -> None:
    def refuse(request: requests.PreparedRequest) -> requests.Response:
        raise requests.ConnectionError("refused", request=request)

    handler = make_handler(settings_for(), session=mock_session(refuse), connect_wait=0.0)
    out = asyncio.run(handler({"input": seed_004_input("x")}))
    assert out["error_type"] == "internal"
    assert "unreachable" in out["error"]


def test_a_missing_runpod_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "runpod", None)
    with pytest.raises(ConfigError, match=r"runpod package is not installed: pip install"):
        cmd_runpod_worker(settings_for(), __import__("argparse").Namespace(runpod_args=[]))


# ---------------------------------------------------------------- against a running job API
class Directory:
    def __init__(self, port: int) -> None:
        self.view = InstanceView(0, "comfyui_gpu0", port, InstanceState.READY)

    def snapshot(self) -> list[InstanceView]:
        return [self.view]

    def report_hung(self, index: int, reason: str) -> None:
        pass


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """One simulated instance (0.1 s per prompt): its port and its directory."""
    from orchestrator.simulator.tree import write_code_tree

    base = tmp_path_factory.mktemp("rp")
    write_code_tree(base / "ComfyUI")
    server = ComfyServer(base / "ComfyUI", base, env={"SIM_EXEC_TIME": "0.1"}, log_path=base / "log.txt")
    try:
        server.wait_ready(30)
        yield server.port, base
    finally:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="module")
def job_api(sim: tuple[int, Path]) -> Iterator[tuple[Settings, int]]:
    """The job router served by uvicorn in a thread, with a token; yields (settings, port)."""
    port = free_port()
    settings = settings_for(port, orchestrator_token="rp-secret-token")
    manager = JobManager(settings, Directory(sim[0]), CollectorRegistry(), poll_interval=0.1, check_interval=0.1)
    with ServedApp(jobs_app(manager), port):
        yield settings, port


def test_the_handler_runs_the_seeds_example_input(job_api: tuple[Settings, int], sim: tuple[int, Path]) -> None:
    settings, _ = job_api
    handler = make_handler(settings)
    out = asyncio.run(handler({"id": "rp-1", "input": seed_003_input(4242)}))
    assert out["status"] == "success", out
    assert len(out["images"]) == len(out["filenames"]) == 1
    assert base64.b64decode(out["images"][0]).startswith(b"\x89PNG")
    assert (sim[1] / "output" / out["filenames"][0]).is_file()
    assert out["prompt_id"]
    assert out["execution_time_seconds"] > 0


def test_the_handler_applies_overrides_and_uploads_input_images(
    job_api: tuple[Settings, int], sim: tuple[int, Path]
) -> None:
    settings, _ = job_api
    workflow = {
        "10": {"class_type": "LoadImage", "inputs": {"image": "rp-input.png"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "rp"}},
    }
    inp = {
        "workflow": workflow,
        "images": [{"name": "rp-input.png", "image": PNG_1PX}],
        "overrides": [{"node_id": "11", "field": "inputs.filename_prefix", "value": "from-override"}],
        "return": "filenames",
    }
    out = asyncio.run(make_handler(settings)({"input": inp}))
    assert out["status"] == "success", out
    assert out["filenames"][0].startswith("from-override")
    assert out["images"] == []
    assert (sim[1] / "input" / "rp-input.png").read_bytes() == base64.b64decode(PNG_1PX)


def test_the_handler_reports_validation_errors_naming_the_node(job_api: tuple[Settings, int]) -> None:
    settings, _ = job_api
    inp = {"workflow": WORKFLOW, "overrides": [{"node_id": "66", "field": "inputs.text", "value": "x"}]}
    out = asyncio.run(make_handler(settings)({"input": inp}))
    assert out["status"] == "error"
    assert out["error_type"] == "validation"
    assert "node 66 is not in the workflow" in out["error"]


def test_the_handler_without_the_token_is_refused(job_api: tuple[Settings, int]) -> None:
    _, port = job_api
    out = asyncio.run(make_handler(settings_for(port))({"input": seed_004_input("x")}))
    assert out["error_type"] == "internal"
    assert "bearer token" in out["error"]


@needs_runpod
def test_the_sdk_test_input_mode_runs_one_job_through_the_cli(job_api: tuple[Settings, int], tmp_path: Path) -> None:
    _, port = job_api
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "ORCHESTRATOR_"))}
    env.update(ROOT=str(tmp_path), ORCHESTRATOR_PORT=str(port), ORCHESTRATOR_TOKEN="rp-secret-token")
    test_input = json.dumps({"input": seed_004_input("a lighthouse, from the CLI")})
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "runpod-worker", "--test_input", test_input],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "'status': 'success'" in r.stdout
    assert "rp-secret-token" not in r.stdout + r.stderr


@needs_runpod
def test_the_sdk_test_input_mode_exits_1_on_a_failed_job(
    job_api: tuple[Settings, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import signal

    settings, _ = job_api
    monkeypatch.setattr(sys, "argv", ["orchestrator"])
    previous = signal.getsignal(signal.SIGINT)
    args = argparse.Namespace(
        test_input=json.dumps({"input": {"workflow": WORKFLOW, "seed": -5}}),
        rp_log_level="ERROR",
        rp_serve_api=False,
        rp_api_port=None,
        rp_api_host=None,
        runpod_args=[],
    )
    try:
        with pytest.raises(SystemExit) as info:
            cmd_runpod_worker(settings, args)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert info.value.code == 1
    assert "seed: -5 is out of range" in capsys.readouterr().out
