"""Outputs that leave the machine: with ``OUTPUT_UPLOAD=s3://bucket/prefix`` each finished job's
output files go to ``prefix/<job id>/<subfolder>/<file>`` and the job's result gives their URLs.

boto3 does the transfer (multipart for large files) with a SHA-256 checksum on every part, which
the server checks against the bytes it stored; the object's size is then read back. Only after
that is the local copy deleted (``OUTPUT_UPLOAD_KEEP_LOCAL=false``, the default). A failed upload
is retried ``OUTPUT_UPLOAD_RETRIES`` times with backoff; if it still fails the file stays where
it is, the job still succeeds, and its output says why it was not uploaded. Credentials,
endpoint and region come from the settings (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION), so MinIO, R2 and S3 all work.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_exponential

from orchestrator.core.converters import split_s3_url
from orchestrator.core.settings import Settings
from orchestrator.jobs.schemas import OutputFile
from orchestrator.jobs.store import Job

log = logging.getLogger(__name__)


class UploadFailed(Exception):
    """One file could not be uploaded (the message names it and the reason, never a credential)."""


class OutputUploader:
    """Uploads a job's output files and puts their URLs on the job's outputs.

    Args:
        settings: OUTPUT_UPLOAD* and the AWS settings.
        output_dir: GPU index → that instance's output folder.
        wait_base: first backoff between attempts, in seconds (doubles, at most 10 s).
    """

    def __init__(self, settings: Settings, output_dir: Callable[[int], Path], *, wait_base: float = 0.5) -> None:
        self.settings = settings
        self.bucket, self.prefix = split_s3_url(settings.output_upload)
        self.output_dir = output_dir
        self.wait_base = wait_base
        self._client: Any = None
        self._lock = threading.Lock()
        self.uploaded = 0
        self.failed = 0
        self.bytes = 0

    def client(self) -> Any:
        """The boto3 S3 client, made once (boto3 clients are thread-safe, their creation is not)."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                s = self.settings
                session = boto3.session.Session(
                    aws_access_key_id=s.aws_access_key_id or None,
                    aws_secret_access_key=s.aws_secret_access_key or None,
                    aws_session_token=s.aws_session_token or None,
                    region_name=s.aws_region or None,
                )
                config = Config(
                    signature_version="s3v4",
                    retries={"max_attempts": 2, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60,
                    s3={"addressing_style": "path"} if s.aws_endpoint_url else {},
                )
                self._client = session.client("s3", endpoint_url=s.aws_endpoint_url or None, config=config)
            return self._client

    async def upload(self, job: Job) -> None:
        """Upload the job's ``output`` files (one at a time, in a worker thread); never raises."""
        if job.instance is None:
            return
        done: list[OutputFile] = []
        for item in job.outputs:
            if item.type != "output":
                done.append(item)
                continue
            try:
                path = self._local_path(job.instance.index, item)
                key = "/".join(p for p in (self.prefix, job.id, item.subfolder, item.filename) if p)
                url = await self._upload_with_retries(path, key)
            except UploadFailed as exc:
                self.failed += 1
                log.warning("job %s: %s", job.id, exc)
                done.append(item.model_copy(update={"upload_error": str(exc)}))
                continue
            done.append(item.model_copy(update={"url": url}))
        job.outputs = done

    def _local_path(self, index: int, item: OutputFile) -> Path:
        base = self.output_dir(index).resolve()
        path = (base / item.subfolder / item.filename).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise UploadFailed(f"output {item.subfolder}/{item.filename} is not a file under {base}")
        return path

    async def _upload_with_retries(self, path: Path, key: str) -> str:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.settings.output_upload_retries),
                wait=wait_exponential(multiplier=self.wait_base, max=10),
                reraise=False,
            ):
                with attempt:
                    return await asyncio.to_thread(self._upload_one, path, key)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            why = self.settings.redact(_describe(cause))
            raise UploadFailed(
                f"upload of {path.name} to s3://{self.bucket}/{key} failed "
                f"{self.settings.output_upload_retries} times ({why}); the file stays at {path}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying either returns or raises

    def _upload_one(self, path: Path, key: str) -> str:
        """Upload, check the stored size, delete the local copy (unless kept); the object's URL."""
        client = self.client()
        size = path.stat().st_size
        client.upload_file(str(path), self.bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        stored = client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        if stored != size:
            raise UploadFailed(f"s3://{self.bucket}/{key} holds {stored} bytes, {path.name} has {size}")
        self.uploaded += 1
        self.bytes += size
        if not self.settings.output_upload_keep_local:
            path.unlink(missing_ok=True)
        return self.url(key)

    def url(self, key: str) -> str:
        """A presigned GET URL (OUTPUT_UPLOAD_PRESIGN > 0) or the object's plain URL."""
        client = self.client()
        if self.settings.output_upload_presign > 0:
            params = {"Bucket": self.bucket, "Key": key}
            expires = int(self.settings.output_upload_presign)
            return str(client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires))
        endpoint = str(client.meta.endpoint_url).rstrip("/")
        if self.settings.aws_endpoint_url:
            return f"{endpoint}/{self.bucket}/{quote(key)}"
        return f"https://{self.bucket}.s3.{client.meta.region_name}.amazonaws.com/{quote(key)}"


def _describe(exc: BaseException | None) -> str:
    """A one-line reason; botocore's messages name the operation and the server's error code."""
    if exc is None:
        return "unknown error"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


class UploadCollector(Collector):
    """comfyui_output_uploads_total{outcome} and comfyui_output_upload_bytes_total, read on scrape."""

    def __init__(self, uploader: OutputUploader) -> None:
        self.uploader = uploader

    def collect(self) -> Iterator[Metric]:
        files = CounterMetricFamily(
            "comfyui_output_uploads", "Output files sent to OUTPUT_UPLOAD, by outcome", labels=["outcome"]
        )
        files.add_metric(["success"], self.uploader.uploaded)
        files.add_metric(["failed"], self.uploader.failed)
        yield files
        yield CounterMetricFamily(
            "comfyui_output_upload_bytes", "Bytes of output files uploaded", value=self.uploader.bytes
        )
