"""Signed job callbacks (``webhook: {url, secret?}`` on POST /jobs) against a real local receiver
and simulated ComfyUI instances: order, retries under one idempotency key, signatures, failure
accounting without the secret, and delivery of the final event by a restarted monitor."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support import ComfyServer, ServedApp, free_port, http_client, jobs_app, txt2img, wait_for

from orchestrator.core.instances import InstanceView
from orchestrator.core.settings import Settings, load_settings
from orchestrator.core.states import InstanceState
from orchestrator.jobs.journal import JobJournal
from orchestrator.jobs.store import Job
from orchestrator.jobs.tracker import JobManager
from orchestrator.jobs.webhooks import missed, sign

SECRET = "whsec-Zq8v1-never-shown"
FINAL = {"success", "error", "timeout"}


# ---------------------------------------------------------------- a real receiver
@dataclasses.dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


class Receiver:
    """An HTTP server in a thread that answers ``status`` to the first ``fail_first`` attempts of
    each Idempotency-Key, then 200 (``fail_first=-1``: always ``status``)."""

    def __init__(self, fail_first: int = 0, status: int = 500, port: int = 0) -> None:
        self.fail_first, self.status = fail_first, status
        self.deliveries: list[Delivery] = []
        self.attempts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                key = self.headers.get("Idempotency-Key", "")
                with receiver.lock:
                    receiver.attempts[key] += 1
                    failing = receiver.fail_first < 0 or receiver.attempts[key] <= receiver.fail_first
                    code = receiver.status if failing else 200
                    receiver.deliveries.append(Delivery(dict(self.headers.items()), body, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=URLTOKEN"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.answered == 200]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.stop()


# ---------------------------------------------------------------- simulated instances and the job API
class FakeDirectory:
    def __init__(self, sims: list[ComfyServer]) -> None:
        self.views = [InstanceView(i, f"comfyui_gpu{i}", s.port, InstanceState.READY) for i, s in enumerate(sims)]

    def snapshot(self) -> list[InstanceView]:
        return list(self.views)

    def report_hung(self, index: int, reason: str) -> None:
        pass


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """One simulated ComfyUI, 1.2 s per prompt (long enough to be seen queued and running)."""
    from orchestrator.simulator.tree import write_code_tree

    tree = tmp_path_factory.mktemp("comfy") / "ComfyUI"
    write_code_tree(tree)
    base = tmp_path_factory.mktemp("gpu0")
    server = ComfyServer(tree, base, env={"SIM_EXEC_TIME": "1.2"})
    try:
        server.wait_ready()
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(10)


def make_settings(**values: str) -> Settings:
    env = {"ROOT": "/nonexistent-root", "PROBE_INTERVAL": "2", "WEBHOOK_PROGRESS_INTERVAL": "0.2s"}
    return load_settings({**env, **{k.upper(): v for k, v in values.items()}})


class JobApi:
    def __init__(self, sim: ComfyServer, journal: JobJournal | None = None, **settings: str) -> None:
        self.registry = CollectorRegistry()
        self.manager = JobManager(
            make_settings(**settings), FakeDirectory([sim]), self.registry,
            poll_interval=0.1, check_interval=0.1, journal=journal,
        )
        self.manager.webhooks.backoff = 0.05
        self.served = ServedApp(jobs_app(self.manager))
        self.client = http_client(self.served.url, timeout=60)

    def deliveries(self, outcome: str) -> float:
        text = generate_latest(self.registry).decode()
        line = f'comfyui_webhook_deliveries_total{{outcome="{outcome}"}} '
        (value,) = [ln[len(line):] for ln in text.splitlines() if ln.startswith(line)]
        return float(value)

    def idle(self) -> bool:
        return not self.manager.webhooks._tasks

    def stop(self) -> None:
        self.client.close()
        self.served.stop()


@pytest.fixture
def apis() -> Iterator[list[JobApi]]:
    made: list[JobApi] = []
    yield made
    for api in made:
        api.stop()


_seed = iter(range(1, 1 << 30))


def job(url: str, secret: str | None = SECRET, **extra: Any) -> dict[str, Any]:
    webhook = {"url": url, **({"secret": secret} if secret else {})}
    return {"workflow": txt2img("hook"), "seed": next(_seed), "wait": False, "webhook": webhook, **extra}


def valid_signature(d: Delivery, secret: str = SECRET) -> bool:
    timestamp = d.headers["X-Orchestrator-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + d.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, d.headers.get("X-Orchestrator-Signature", ""))


def final_delivery(receiver: Receiver, job_id: str) -> Delivery:
    def final() -> Delivery | None:
        done = [d for d in receiver.accepted() if d.json["id"] == job_id and d.json["event"] in FINAL]
        return done[0] if done else None

    return wait_for(final, 60, 0.05, what=f"the final webhook event of job {job_id}")


# ---------------------------------------------------------------- what is sent when (pure)
def test_statuses_passed_between_two_looks_are_still_sent_in_order() -> None:
    job = Job("a" * 32, {}, [], "filenames", None, 60.0, 0.0, 0.0, 60.0)
    assert missed(job, None) == []  # pending: nothing yet
    job.status, job.prompt_id = "running", "p"
    job.started_mono = 1.0
    assert missed(job, None) == ["queued", "running"]
    assert missed(job, "running") == []
    job.status = "success"
    assert missed(job, "queued") == ["running", "success"]
    never_ran = Job("b" * 32, {}, [], "filenames", None, 60.0, 0.0, 0.0, 60.0, status="error")
    assert missed(never_ran, None) == ["error"]  # refused at submission: never queued, never ran


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert sign("k", "1700000000", b"{}") == f"sha256={expected}"


# ---------------------------------------------------------------- against the receiver
def test_every_event_arrives_in_order_signed_under_one_key_across_retries(
    sim: ComfyServer, receivers: list[Receiver], apis: list[JobApi]
) -> None:
    receiver = Receiver(fail_first=2, status=500)
    receivers.append(receiver)
    api = JobApi(sim)
    apis.append(api)
    r = api.client.post("/jobs", json=job(receiver.url))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    final = final_delivery(receiver, job_id)
    events = [d for d in receiver.accepted() if d.json["id"] == job_id]
    names = [d.json["event"] for d in events]
    done = [d.json["job"]["progress"]["nodes_done"] for d in events]
    assert done == sorted(done), done  # progress only goes forward
    assert done[-1] == 7
    assert names[0] == "queued", names
    assert names[-1] == "success", names
    assert names.count("success") == 1, names
    assert set(names[1:-1]) == {"running"}, names
    assert [d.json["sequence"] for d in events] == list(range(1, len(events) + 1))
    for d in events:
        key = d.headers["Idempotency-Key"]
        assert key == f"{job_id}:{d.json['sequence']}"
        assert d.headers["X-Orchestrator-Event"] == d.json["event"] == d.json["job"]["status"]
        assert valid_signature(d), d.headers
        tries = [t for t in receiver.deliveries if t.headers["Idempotency-Key"] == key]
        assert [t.answered for t in tries] == [500, 500, 200]  # retried under the same key
        assert all(valid_signature(t) for t in tries)
    got = api.client.get(f"/jobs/{job_id}")
    assert final.json["job"]["outputs"]
    assert final.json["job"]["outputs"] == got.json()["outputs"]
    assert final.json["job"]["progress"] == got.json()["progress"]
    assert SECRET not in got.text
    assert "secret" not in got.text
    wait_for(api.idle, 30, 0.05, what="the deliverer done")
    assert api.deliveries("delivered") == len(events)
    assert api.deliveries("retried") == 2 * len(events)
    assert api.deliveries("failed") == 0
    assert SECRET not in generate_latest(api.registry).decode()


def test_without_a_secret_nothing_is_signed(sim: ComfyServer, receivers: list[Receiver], apis: list[JobApi]) -> None:
    receiver = Receiver()
    receivers.append(receiver)
    api = JobApi(sim)
    apis.append(api)
    job_id = api.client.post("/jobs", json=job(receiver.url, secret=None)).json()["id"]
    final = final_delivery(receiver, job_id)
    assert "X-Orchestrator-Signature" not in final.headers
    assert final.headers["X-Orchestrator-Event"] == "success"


def test_a_receiver_down_for_the_whole_window_is_counted_and_logged_once_without_the_secret(
    sim: ComfyServer, apis: list[JobApi], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="orchestrator.jobs.webhooks")
    api = JobApi(sim, webhook_retries="2", webhook_max_seconds="3s")
    apis.append(api)
    url = f"http://127.0.0.1:{free_port()}/hook?token=URLTOKEN"  # nothing listens there
    job_id = api.client.post("/jobs", json=job(url)).json()["id"]
    assert api.client.get(f"/jobs/{job_id}", params={"wait": 30}).json()["status"] == "success"
    wait_for(api.idle, 60, 0.05, what="the deliverer given up")
    assert api.deliveries("failed") >= 2  # queued (or running) and success at least
    assert api.deliveries("delivered") == 0
    assert api.deliveries("retried") >= 4  # each of those retried twice
    warnings = [r for r in caplog.records if r.name == "orchestrator.jobs.webhooks" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert job_id in warnings[0].getMessage()
    assert "not delivered after 3 attempt(s)" in warnings[0].getMessage()
    assert any(f"job {job_id}: webhook success event" in r.getMessage() for r in caplog.records)  # tried too
    assert SECRET not in caplog.text
    assert "URLTOKEN" not in caplog.text


def test_a_client_error_is_not_retried(sim: ComfyServer, receivers: list[Receiver], apis: list[JobApi]) -> None:
    receiver = Receiver(fail_first=-1, status=410)
    receivers.append(receiver)
    api = JobApi(sim)
    apis.append(api)
    job_id = api.client.post("/jobs", json=job(receiver.url)).json()["id"]
    assert api.client.get(f"/jobs/{job_id}", params={"wait": 30}).json()["status"] == "success"
    wait_for(api.idle, 30, 0.05, what="the deliverer done")
    assert set(receiver.attempts.values()) == {1}  # each event tried once
    assert [d.json["event"] for d in receiver.deliveries] == ["queued", "success"]  # then only the final one
    assert api.deliveries("failed") >= len(receiver.attempts)
    assert api.deliveries("retried") == 0


@pytest.mark.parametrize(
    ("webhook", "says"),
    [
        ({"url": "ftp://example.com/hook"}, "webhook.url: Value error, must be an http:// or https:// URL"),
        ({"url": "not a url"}, "webhook.url: Value error"),
        ({"url": "http://"}, "webhook.url: Value error"),
        ({"url": "https://example.com/h", "secret": 5}, "webhook.secret"),
        ({"url": "https://example.com/h", "extra": 1}, "webhook.extra"),
    ],
)
def test_a_bad_webhook_is_a_400_naming_the_field(
    sim: ComfyServer, apis: list[JobApi], webhook: dict[str, Any], says: str
) -> None:
    if not apis:
        apis.append(JobApi(sim))
    r = apis[0].client.post("/jobs", json={"workflow": txt2img("bad"), "webhook": webhook})
    assert r.status_code == 400, r.text
    assert says in r.json()["message"]
    assert r.json()["field"].startswith("webhook.")


def test_a_restarted_monitor_still_delivers_the_final_event(
    sim: ComfyServer, receivers: list[Receiver], tmp_path: Path
) -> None:
    down = Receiver(fail_first=-1, status=503)  # refuses everything while the first monitor runs
    receivers.append(down)
    journal_dir = tmp_path / "journal"
    first = JobApi(sim, JobJournal(journal_dir), webhook_retries="100", webhook_max_seconds="60s")
    try:
        job_id = first.client.post("/jobs", json=job(down.url)).json()["id"]
        wait_for(lambda: down.deliveries, 30, 0.05, what="a first attempt")
        state = journal_dir / f"{job_id}.webhook.json"
        assert state.stat().st_mode & 0o777 == 0o600
        assert json.loads(state.read_text())["secret"] == SECRET
    finally:
        first.stop()  # the monitor goes away with the events undelivered
    port = int(down.url.split(":")[2].split("/")[0])
    down.stop()
    receivers.remove(down)
    up = Receiver(port=port)
    receivers.append(up)
    second = JobApi(sim, JobJournal(journal_dir))
    try:
        final = final_delivery(up, job_id)
        assert final.json["event"] == "success"
        assert final.json["job"]["outputs"]
        assert valid_signature(final)
        sequences = [d.json["sequence"] for d in up.accepted() if d.json["id"] == job_id]
        assert sequences == sorted(sequences)
        assert len(set(sequences)) == len(sequences)
        before = {d.headers["Idempotency-Key"]: d.json["event"] for d in down.deliveries}
        for d in up.accepted():  # a key sent before names the same event: never reused for another
            assert before.get(d.headers["Idempotency-Key"], d.json["event"]) == d.json["event"]
        wait_for(lambda: not state.exists(), 30, 0.05, what="the webhook state dropped after the final event")
    finally:
        second.stop()
