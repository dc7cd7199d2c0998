"""Outputs that leave the machine: OUTPUT_UPLOAD against a real S3-compatible server (moto's
server mode, a separate process speaking the S3 HTTP API), never a mock of boto3."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry
from support import ComfyServer, ServedApp, answers, free_port, http_client, jobs_app, stop_process, txt2img, wait_for

from orchestrator.core.instances import InstanceView
from orchestrator.core.settings import Settings, load_settings
from orchestrator.core.states import InstanceState
from orchestrator.jobs.schemas import OutputFile
from orchestrator.jobs.store import Job
from orchestrator.jobs.tracker import JobManager
from orchestrator.jobs.uploads import OutputUploader, UploadCollector

pytest.importorskip("moto.server", reason="moto[server] (a test extra) runs the local S3 server")
BUCKET = "outputs"


class S3Server:
    """moto's S3 server on a free port, in its own process."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "moto.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self.proc.poll() is None and answers(self.port, "/moto-api/"), 60, 0.1, what="moto server")

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="AKIATEST", region_name="us-east-1",
                            aws_secret_access_key="s3cr3t-upload-key")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    stop_process(server.proc)


def settings_for(s3: S3Server, **values: str) -> Settings:
    env = {"ROOT": "/nonexistent-root", "OUTPUT_UPLOAD": f"s3://{BUCKET}/comfy/", "AWS_ENDPOINT_URL": s3.url,
           "AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "s3cr3t-upload-key", "AWS_REGION": "us-east-1",
           **{k.upper(): v for k, v in values.items()}}
    return load_settings(env)


def finished_job(out: Path, files: dict[str, bytes]) -> Job:
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    job = Job(id="f" * 32, workflow={}, images=[], return_mode="filenames", gpu=None, timeout=60.0,
              created_at=time.time(), created_mono=time.monotonic(), deadline=time.monotonic() + 60)
    job.instance = InstanceView(0, "comfyui_gpu0", 8188, InstanceState.READY)
    job.outputs = [OutputFile(node_id="9", filename=Path(n).name, subfolder=str(Path(n).parent).strip("."))
                   for n in files]
    return job


def test_outputs_are_uploaded_and_their_presigned_urls_serve_the_same_bytes(s3: S3Server, tmp_path: Path) -> None:
    files = {"a_00001_.png": b"\x89PNG first" * 1000, "sub/b_00001_.png": b"\x89PNG second" * 3000}
    job = finished_job(tmp_path, files)
    uploader = OutputUploader(settings_for(s3, output_upload_presign="300"), lambda i: tmp_path)
    asyncio.run(uploader.upload(job))
    for out, (name, data) in zip(job.outputs, files.items(), strict=True):
        assert out.upload_error is None
        assert out.url
        assert "X-Amz-Signature=" in out.url
        assert requests.get(out.url, timeout=10).content == data
        assert not (tmp_path / name).exists(), "the local copy goes after a verified upload"
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="comfy/")["Contents"])
    assert f"comfy/{job.id}/sub/b_00001_.png" in keys
    assert f"comfy/{job.id}/a_00001_.png" in keys
    registry = CollectorRegistry()
    registry.register(UploadCollector(uploader))
    assert registry.get_sample_value("comfyui_output_uploads_total", {"outcome": "success"}) == 2
    assert registry.get_sample_value("comfyui_output_upload_bytes_total") == sum(map(len, files.values()))


def test_plain_urls_and_kept_local_copies(s3: S3Server, tmp_path: Path) -> None:
    job = finished_job(tmp_path, {"c.png": b"third"})
    uploader = OutputUploader(settings_for(s3, output_upload_keep_local="true"), lambda i: tmp_path)
    asyncio.run(uploader.upload(job))
    assert job.outputs[0].url == f"{s3.url}/{BUCKET}/comfy/{job.id}/c.png"
    assert (tmp_path / "c.png").read_bytes() == b"third"


def test_a_failed_upload_is_retried_then_reported_and_the_file_is_kept(s3: S3Server, tmp_path: Path) -> None:
    job = finished_job(tmp_path, {"d.png": b"fourth"})
    settings = settings_for(s3, output_upload="s3://no-such-bucket/x", output_upload_retries="3")
    uploader = OutputUploader(settings, lambda i: tmp_path, wait_base=0.01)
    asyncio.run(uploader.upload(job))
    error = job.outputs[0].upload_error or ""
    assert "failed 3 times" in error
    assert "NoSuchBucket" in error or "does not exist" in error
    assert "s3cr3t-upload-key" not in error
    assert job.outputs[0].url is None
    assert (tmp_path / "d.png").read_bytes() == b"fourth", "a failed upload never loses the file"
    registry = CollectorRegistry()
    registry.register(UploadCollector(uploader))
    assert registry.get_sample_value("comfyui_output_uploads_total", {"outcome": "failed"}) == 1


def test_an_output_outside_the_instances_folder_is_not_uploaded(s3: S3Server, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("not an output")
    out = tmp_path / "out"
    out.mkdir()
    job = finished_job(out, {})
    job.outputs = [OutputFile(node_id="9", filename="secret.txt", subfolder="..")]
    asyncio.run(OutputUploader(settings_for(s3), lambda i: out).upload(job))
    assert "is not a file under" in (job.outputs[0].upload_error or "")
    assert (tmp_path / "secret.txt").exists()


class OneInstance:
    """The monitor's directory over one simulated instance, always READY."""

    def __init__(self, port: int) -> None:
        self.view = InstanceView(0, "comfyui_gpu0", port, InstanceState.READY)

    def snapshot(self) -> list[InstanceView]:
        return [self.view]

    def report_hung(self, index: int, reason: str) -> None:
        raise AssertionError(f"no job should hang here: {reason}")


def test_a_job_through_the_api_returns_urls_of_its_uploaded_outputs(s3: S3Server, tmp_path: Path) -> None:
    from orchestrator.simulator.tree import write_code_tree

    tree = tmp_path / "ComfyUI"
    write_code_tree(tree)
    sim = ComfyServer(tree, tmp_path / "gpu0", env={"SIM_EXEC_TIME": "0.2"})
    try:
        sim.wait_ready()
        settings = settings_for(s3, output_upload_presign="60")
        manager = JobManager(settings, OneInstance(sim.port), CollectorRegistry(), poll_interval=0.1,
                             check_interval=0.1, uploader=OutputUploader(settings, lambda i: sim.output))
        with ServedApp(jobs_app(manager)) as app, http_client(app.url, timeout=60) as c:
            answer = c.post("/jobs", json={"workflow": txt2img("upload"), "wait": True}).json()
        assert answer["status"] == "success", answer
        assert answer["outputs"]
        for out in answer["outputs"]:
            assert out["url"], out
            body = requests.get(out["url"], timeout=10).content
            assert body.startswith(b"\x89PNG")
            assert not (sim.output / out["subfolder"] / out["filename"]).exists()
    finally:
        sim.stop()
