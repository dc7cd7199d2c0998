"""The job API's request and response models (pydantic), and their conversions from what ComfyUI
reports (``comfy.protocol`` values). Error answers use ``core.http.ErrorResponse``.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from orchestrator.comfy.protocol import Failure, OutputRef
from orchestrator.core.workflow import WorkflowError

JobStatus = Literal["pending", "queued", "running", "success", "error", "timeout"]
FINAL_STATUSES = frozenset({"success", "error", "timeout"})
ErrorType = Literal["validation", "execution", "interrupted", "instance", "timeout", "internal"]
ReturnMode = Literal["filenames", "base64"]

_IMAGE_NAME = re.compile(r"^[\w][\w .()+-]{0,200}$")


class OverrideIn(BaseModel):
    """Set one value: ``workflow[node_id]`` at the dotted ``field`` path."""

    model_config = ConfigDict(extra="forbid")
    node_id: str = Field(description='Node id in the workflow, e.g. "6"', examples=["6"])
    field: str = Field(description="Dotted path inside the node", examples=["inputs.text"])
    value: Any = Field(description="The new value")

    @field_validator("node_id", mode="before")
    @classmethod
    def _node_id_as_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class InputImage(BaseModel):
    """An input image uploaded to the instance's input folder before the prompt is queued."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="File name that LoadImage nodes refer to", examples=["input.png"])
    image: str = Field(description="Base64 data (a data: URI prefix is accepted)")


class WebhookIn(BaseModel):
    """Where the job's status changes are POSTed; signed with HMAC-SHA256 when a secret is given."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="http:// or https:// URL that receives the events", max_length=2048)
    secret: SecretStr | None = Field(default=None, description="Key of the X-Orchestrator-Signature HMAC")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            ok = parts.scheme in {"http", "https"} and bool(parts.hostname) and parts.port != 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. https://example.com/hook")
        return v


class JobRequest(BaseModel):
    """A workflow to run, with overrides or the serverless seed's shorthand."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    workflow: dict[str, dict[str, Any]] = Field(description="ComfyUI workflow in API format")
    overrides: list[OverrideIn] = Field(default_factory=list)
    gpu: int | None = Field(default=None, ge=0, description="Pin the job to this GPU's instance")
    timeout: float | None = Field(
        default=None, gt=0, le=86400, description="Deadline in seconds from submission (default JOB_TIMEOUT)"
    )
    wait: bool = Field(default=True, description="true: answer when the job is done; false: 202 at once")
    return_: ReturnMode = Field(
        default="filenames", alias="return", description="base64: include the output files' data"
    )
    prompt: str | None = Field(default=None, description="Shorthand: text of the prompt node")
    prompt_node_id: str | None = None
    seed: int | None = Field(default=None, description="Shorthand: seed of the sampler/noise node")
    seed_node_id: str | None = None
    width: int | None = Field(default=None, description="Shorthand: latent width")
    height: int | None = Field(default=None, description="Shorthand: latent height")
    size_node_id: str | None = None
    images: list[InputImage] = Field(default_factory=list, description="Input images to upload first")
    webhook: WebhookIn | None = Field(default=None, description="POST each status change there (signed)")

    @field_validator("prompt_node_id", "seed_node_id", "size_node_id", mode="before")
    @classmethod
    def _ids_as_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class OutputFile(BaseModel):
    node_id: str
    filename: str
    subfolder: str = ""
    type: str = "output"
    data: str | None = Field(default=None, description="Base64 file content when return=base64")
    url: str | None = Field(default=None, description="Where the file was uploaded (OUTPUT_UPLOAD)")
    upload_error: str | None = Field(default=None, description="Why the upload failed (the file stays local)")


class InstanceRef(BaseModel):
    gpu: int
    name: str
    port: int


class JobErrorInfo(BaseModel):
    type: ErrorType
    message: str
    node_id: str | None = None
    node_type: str | None = None
    field: str | None = None


class JobProgress(BaseModel):
    nodes_done: int = Field(description="Nodes finished or served from cache")
    nodes_total: int = Field(description="Nodes in the workflow")


class NodeTime(BaseModel):
    id: str = Field(description="Node id in the workflow")
    class_type: str = Field(description="The node's class (empty when unknown)")
    seconds: float = Field(description="Execution time, from its executing event to the next node's (0 when cached)")
    cached: bool = Field(description="Served from the instance's cache (not executed)")


class RoutingInfo(BaseModel):
    instance: str = Field(description="The instance chosen, e.g. comfyui_gpu1")
    policy: str = Field(description="ROUTING_POLICY in force: capacity or least_queue (pinned: gpu was given)")
    reason: str = Field(description="Why this instance: expected finish times, jobs ahead, models loaded")


class JobResponse(BaseModel):
    id: str
    status: JobStatus
    prompt_id: str | None = None
    progress: JobProgress | None = Field(
        default=None, description="Per-node progress once the instance has the prompt (from its /ws events)"
    )
    instance: InstanceRef | None = None
    outputs: list[OutputFile] = Field(default_factory=list)
    error: JobErrorInfo | None = None
    execution_time_seconds: float | None = None
    queue_wait_seconds: float | None = None
    total_seconds: float | None = None
    created_at: float = Field(description="Unix time the job was accepted")
    finished_at: float | None = None
    attempts: int = Field(description="Instances the job was sent to (2 after a resubmission)")
    run_seconds: float | None = Field(
        default=None, description="Execution time on the instance (as execution_time_seconds)"
    )
    nodes: list[NodeTime] = Field(
        default_factory=list, description="Per node, in execution order after the cached ones (from the /ws events)"
    )
    routing: RoutingInfo | None = Field(default=None, description="Which instance was chosen and why")
    peak_vram_bytes: int | None = Field(
        default=None, description="Most GPU memory used on the job's device while it ran (real GPUs only)"
    )


def error_info(failure: Failure) -> JobErrorInfo:
    """A job error from what ComfyUI reported (an execution error, interruption or refusal)."""
    return JobErrorInfo(
        type=failure.type,
        message=failure.message,
        node_id=failure.node_id,
        node_type=failure.node_type,
        field=failure.field,
    )


def output_file(ref: OutputRef) -> OutputFile:
    return OutputFile(node_id=ref.node_id, filename=ref.filename, subfolder=ref.subfolder, type=ref.type)


def decode_image(item: InputImage) -> bytes:
    """The bytes of an input image; base64 with an optional ``data:…;base64,`` prefix.

    Raises:
        WorkflowError: a file name that is not a plain name, or data that is not base64.
    """
    if not _IMAGE_NAME.match(item.name) or ".." in item.name:
        raise WorkflowError(
            f"images: invalid file name {item.name!r}; use a plain name such as input.png", field="images"
        )
    data = item.image
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise WorkflowError(f"images: {item.name} is not valid base64", field="images") from None
