"""Typed, frozen settings built once at the edge.

Each setting is declared once, as an attribute of :class:`Settings`: its type, and through
:func:`setting` its default (the text an environment variable would hold), converter, help and old
names. The variable's name is the attribute's in upper case. :data:`FIELDS` is derived from those
declarations, and drives loading, ``orchestrator config`` and the README table test.

Precedence: flag (``--set NAME=VALUE`` and dedicated flags) > environment > YAML settings file
(``--config FILE`` or ``ORCHESTRATOR_CONFIG``) > default. Every field has a pure converter
(:mod:`orchestrator.core.converters`) that raises ``ValueError`` with what it expected;
:func:`load_settings` turns that into a one-line :class:`ConfigError` naming the variable and the value.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.configfile import load_yaml, read_config
from orchestrator.core.converters import (
    choice,
    int_in,
    to_args,
    to_bool,
    to_comfy_listen,
    to_duration,
    to_list,
    to_listen,
    to_mock_gpu,
    to_optional_count,
    to_optional_path,
    to_path,
    to_port,
    to_positive_duration,
    to_s3_url,
    to_str,
    to_umask,
)
from orchestrator.core.disk import DiskFloor, to_disk_floor, to_size
from orchestrator.core.errors import ConfigError
from orchestrator.core.memory import to_fraction, to_memory_max, to_optional_size

FORK_URL = "https://github.com/stakeordie/ComfyUI.git"
UPSTREAM_URL = "https://github.com/comfyanonymous/ComfyUI.git"
SHARED_URL = "https://github.com/stakeordie/emprops_shared.git"
PINNED_COMMIT = "02a1b01aad28470f06c8b4f95b90914413d3e4c8"

REDACTED = "***"
_SPEC = "setting"  # the dataclass metadata key that carries a field's Field


@dataclasses.dataclass(frozen=True)
class Field:
    """How one setting is read: its text default, converter, help, old names and whether it is a secret."""

    default: str
    convert: Callable[[str], Any]
    help: str
    aliases: tuple[str, ...] = ()
    secret: bool = False
    attr: str = ""  # the Settings attribute; filled in when FIELDS is derived

    @property
    def env(self) -> str:
        return self.attr.upper()

    def parse(self, raw: str) -> Any:
        """The typed value of ``raw``; raises ``ValueError`` saying what was expected."""
        if "\0" in raw:
            raise ValueError("a value may not contain a NUL byte")
        return self.convert(raw)


def setting(default: str, convert: Callable[[str], Any], help: str, *aliases: str, secret: bool = False) -> Any:
    """Declare one :class:`Settings` attribute (a dataclass field without a default: load_settings fills it)."""
    return dataclasses.field(metadata={_SPEC: Field(default, convert, help, aliases, secret)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The effective settings. Attribute names are the variable names in lower case."""

    root: Path = setting("/workspace", to_path, "Root of everything the orchestrator writes")
    mock_gpu: str = setting("0", to_mock_gpu, "1: k CPU instances instead of GPUs; auto: mock only when no driver")
    num_gpus: int | None = setting("", to_optional_count, "Mock: number of instances (default 1); real: cap on GPUs used", "TEST_GPUS")
    gpus: tuple[str, ...] = setting("", to_list, "Subset of GPUs to run, by index or UUID (e.g. 0,2)")
    mock_gpu_memory_mb: int = setting("24576", int_in(1), "Memory each mock GPU reports, in MiB")
    comfy_repo_url: str = setting(FORK_URL, to_str, "ComfyUI repository (the fork follows COMFY_BRANCH, others COMFY_COMMIT)")
    comfy_branch: str = setting("forward", to_str, "Branch of the fork to follow")
    comfy_commit: str = setting(PINNED_COMMIT, to_str, "Commit for non-fork repositories and the fallback")
    comfy_fallback_url: str = setting(UPSTREAM_URL, to_str, "Repository used at COMFY_COMMIT when COMFY_REPO_URL cannot be cloned")
    comfy_on_missing_branch: str = setting("fail", choice("fail", "fallback"), "COMFY_BRANCH not in the fork: fail (exit 1), or fallback (keep the tree, or COMFY_FALLBACK_URL on a first boot)")
    comfy_update: str = setting("interval", choice("always", "never", "interval"), "When `up` fetches the ComfyUI branch and the shared repo: every boot, never once cloned, or after COMFY_UPDATE_INTERVAL")
    comfy_update_interval: float = setting("1h", to_duration, "With COMFY_UPDATE=interval: seconds since the last fetch before `up` fetches again")
    comfy_args: tuple[str, ...] = setting("", to_args, "Extra ComfyUI flags for every instance", "COMFY_FLAGS")
    comfy_python: str = setting("", to_str, "Interpreter that runs ComfyUI's main.py (default: the orchestrator's)")
    worker_base_comfyui_port: int = setting("8188", to_port, "Instance N listens on this port + N")
    comfy_listen: str = setting("127.0.0.1", to_comfy_listen, "Address every instance listens on: 127.0.0.1, or 0.0.0.0/:: to expose ComfyUI's unauthenticated API to the network (README: Fleet)")
    shared_repo_url: str = setting(SHARED_URL, to_str, "Shared config repository (empty: use the shipped defaults)")
    shared_branch: str = setting("", to_str, "Branch of the shared repo to follow (empty: its default branch)")
    shared_commit: str = setting("", to_str, "Pin the shared repo to this commit")
    storage_test_mode: bool = setting("false", to_bool, "Use config_nodes_test.json", "AWS_TEST_MODE", "AZURE_TEST_MODE")
    cut_pk_1: str = setting("", to_str, "SSH private key, base64, part 1", secret=True)
    cut_pk_2: str = setting("", to_str, "SSH private key, base64, part 2", secret=True)
    cut_pk_3: str = setting("", to_str, "SSH private key, base64, part 3", secret=True)
    ssh_private_key: str = setting("", to_str, "SSH private key (PEM/OpenSSH text or base64)", secret=True)
    git_timeout: float = setting("300s", to_positive_duration, "Timeout of one git network operation")
    nodes_concurrency: int = setting("8", int_in(1, 64), "Parallel custom-node clones/updates")
    node_timeout: float = setting("600s", to_positive_duration, "Timeout per custom node (clone, script)")
    pip_timeout: float = setting("1800s", to_positive_duration, "Timeout of the combined requirements install")
    nodes_installer: str = setting("auto", choice("auto", "uv", "pip"), "Who installs node requirements: auto (uv beside the orchestrator's python or on PATH, else pip), uv, pip")
    opencv_package: str = setting("", choice("", "opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"), "The one OpenCV distribution node requirements are rewritten to (default: the installed one, else opencv-contrib-python-headless)")
    nodes_import_check: bool = setting("true", to_bool, "Import every custom node in a child process (ComfyUI's loader) before instances start")
    lockfile: Path | None = setting("", to_optional_path, "orchestrator.lock that `up` installs exactly (as --locked); empty: record what up installed")
    hf_token: str = setting("", to_str, "Hugging Face token (bearer)", secret=True)
    civitai_token: str = setting("", to_str, "CivitAI token", secret=True)
    models_manifest: Path | None = setting("", to_optional_path, "Model manifest (default: models.yaml in the shared repo)")
    models_concurrency: int = setting("4", int_in(1, 64), "Parallel model downloads")
    models_max_bytes: int = setting("200G", to_size, "Largest model file without a size: in the manifest (e.g. 500M, 200G); a longer body fails that file")
    min_free_disk: DiskFloor = setting("5G,5%", to_disk_floor, "Free space no download may take and output cleanup keeps free (size, percentage of the filesystem, or the smaller of a list: 5G,5%; 0: off)")
    download_retries: int = setting("10", int_in(0, 1000), "Retries per model file and run, with or without progress")
    download_retry_seconds: float = setting("30m", to_positive_duration, "No model file is retried after it has been downloading this long")
    models_connections: int = setting("8", int_in(1, 64), "Ranged connections per large model file when its server supports ranges (1: one stream)")
    models_ranged_min_bytes: int = setting("64M", to_size, "Model files at least this large are fetched over MODELS_CONNECTIONS ranged connections")
    civitai_models: tuple[str, ...] = setting("", to_list, "CivitAI version ids → checkpoints")
    civitai_loras: tuple[str, ...] = setting("", to_list, "CivitAI version ids → loras")
    civitai_vaes: tuple[str, ...] = setting("", to_list, "CivitAI version ids → vae")
    civitai_flux: tuple[str, ...] = setting("", to_list, "CivitAI version ids → diffusion_models")
    huggingface_models: tuple[str, ...] = setting("", to_list, "Hugging Face files (owner/repo/path) or whole repos (owner/repo)")
    hf_endpoint: str = setting("https://huggingface.co", to_str, "Hugging Face server (HF_TOKEN is sent only to this host)")
    civitai_endpoint: str = setting("https://civitai.com", to_str, "CivitAI server (CIVITAI_TOKEN is sent only to this host)")
    cleanup_interval: float = setting("15m", to_positive_duration, "How often old outputs are deleted")
    output_max_age: float = setting("60m", to_duration, "Outputs older than this are deleted (0: off)")
    orchestrator_listen: str = setting("127.0.0.1", to_listen, "Monitor HTTP address")
    orchestrator_port: int = setting("9090", to_port, "Monitor HTTP port")
    orchestrator_token: str = setting("", to_str, "Bearer token for mutating endpoints", secret=True)
    probe_interval: float = setting("5s", to_positive_duration, "Seconds between health probes")
    probe_timeout: float = setting("3s", to_positive_duration, "Timeout of one probe")
    startup_timeout: float = setting("600s", to_positive_duration, "An instance not ready after this is restarted")
    unhealthy_threshold: int = setting("3", int_in(1, 100), "Consecutive failed probes before a restart")
    probe_starting_interval: float = setting("0.25s", to_positive_duration, "Seconds between probes of a STARTING or SUSPECT instance (READY is seen this soon after ComfyUI answers)")
    min_ready_instances: int | None = setting("", to_optional_count, "/readyz is 200 with at least this many READY (default: all)")
    gpu_metrics: str = setting("dcgm", choice("dcgm", "off"), "Export dcgm-exporter style GPU gauges")
    gpu_metrics_host_label: str = setting("Hostname", to_str, "Name of the host label on GPU gauges")
    gpu_metrics_model_label: str = setting("model_name", to_str, "GPU model label (modelName: as dcgm-exporter)")
    gpu_sample_interval: float = setting("5s", to_positive_duration, "NVML sampling interval")
    metrics_cache: float = setting("1s", to_duration, "How long one rendering of /metrics is served to every scraper (0: render per scrape)")
    max_queue_depth: int = setting("8", int_in(1, 10000), "Jobs are refused (503) when every ready instance has this many")
    readyz_saturation: bool = setting("false", to_bool, "/readyz reports not ready while every instance is saturated")
    job_timeout: float = setting("600s", to_positive_duration, "Default job deadline")
    job_min_timeout: float = setting("1s", to_positive_duration, "Smallest job timeout a client may ask for (400 below)")
    job_interrupt_grace: float = setting("30s", to_positive_duration, "A job past its deadline is interrupted; its instance is restarted only if the prompt still runs this long after")
    job_results_max: int = setting("1000", int_in(1), "Finished jobs kept for GET /jobs/{id}")
    job_results_ttl: float = setting("1h", to_positive_duration, "How long finished jobs are kept")
    routing_policy: str = setting("capacity", choice("capacity", "least_queue"), "Job routing: capacity (earliest expected finish from learned speeds, model affinity) or least_queue")
    webhook_retries: int = setting("8", int_in(0, 100), "Retries of one job webhook event after a failed POST (exponential backoff)")
    webhook_max_seconds: float = setting("10m", to_positive_duration, "A job webhook event not delivered within this is given up (counted and logged)")
    webhook_progress_interval: float = setting("1s", to_positive_duration, "Job webhook progress events are sent at most this often per job")
    max_request_bytes: int = setting("67108864", int_in(1), "Largest POST /jobs body in bytes (413 above; 64 MiB fits base64 images)")
    stop_timeout: float = setting("10s", to_positive_duration, "Graceful stop time per instance before SIGKILL")
    shutdown_drain_timeout: float = setting("120s", to_duration, "On SIGTERM the monitor refuses new jobs and waits this long for running ones before it exits (0: exit at once)")
    instance_memory_max: int | None = setting("auto", to_memory_max, "Host-RAM budget of each instance (auto: (host RAM - INSTANCE_MEMORY_RESERVE) / instances; off; or a size such as 24G)")
    instance_memory_reserve: int = setting("4G", to_size, "Host RAM kept out of the auto budgets (the OS, supervisord, the monitor)")
    instance_memory_high_water: float = setting("0.9", to_fraction, "Fraction of the budget whose crossing recycles an instance (drained, then restarted)")
    instance_memory_growth_max: int | None = setting("off", to_optional_size, "Recycle an instance whose RSS grew more than this since its process started (off, or a size)")
    recycle_after_jobs: int | None = setting("", to_optional_count, "Recycle an instance after its process ran this many prompts (empty: never)")
    recycle_drain_timeout: float = setting("30m", to_positive_duration, "A recycle waits this long for the instance's queue to empty, then is retried later")
    memory_sample_interval: float = setting("5s", to_positive_duration, "How often each instance's RSS is sampled")
    drain_timeout: float = setting("300s", to_positive_duration, "A drained instance's prompts are interrupted after this (rolling restarts)")
    rolling_max_unavailable: int = setting("1", int_in(1), "Instances a rolling restart takes out of service at once")
    instance_env_passthrough: tuple[str, ...] = setting("", to_list, "Variables forwarded to ComfyUI instances besides the allow-list (names or globs, e.g. MY_APP_*,HTTPS_PROXY); secrets are refused")
    umask: int = setting("077", to_umask, "Octal umask of the programs supervisord runs (077: outputs, logs and their folders private; 022: readable by all)")
    job_queue_url: str = setting("", to_str, "Redis job queue (redis://[:password@]host:port/db): runs `orchestrator worker` under supervisord; empty: off", secret=True)
    job_max_attempts: int = setting("3", int_in(1, 100), "Deliveries of a queued job before it goes to the dead-letter stream")
    job_lease_seconds: float = setting("30s", to_positive_duration, "A queued job not renewed for this long is reclaimed by another machine")
    machine_id: str = setting("", to_str, "This machine's name in the fleet (default: the host name)")
    fleet_heartbeat_ttl: float = setting("15s", to_positive_duration, "A machine missing heartbeats this long drops out of `fleet status`")
    log_format: str = setting("text", choice("text", "json"), "Log format")
    log_level: str = setting("info", choice("debug", "info", "warning", "error"), "Log level")
    output_upload: str = setting("", to_s3_url, "s3://bucket/prefix: upload finished jobs' outputs there (boto3; MinIO/R2 with AWS_ENDPOINT_URL) and return their URLs")
    output_upload_presign: float = setting("0", to_duration, "With OUTPUT_UPLOAD: return presigned GET URLs valid this long (0: plain object URLs)")
    output_upload_keep_local: bool = setting("false", to_bool, "With OUTPUT_UPLOAD: keep the local copy after a verified upload")
    output_upload_retries: int = setting("4", int_in(1, 100), "With OUTPUT_UPLOAD: attempts per file before the job reports the upload error (the file stays)")
    aws_endpoint_url: str = setting("", to_str, "S3-compatible endpoint for OUTPUT_UPLOAD (MinIO, R2; empty: AWS)")
    aws_region: str = setting("", to_str, "Region for OUTPUT_UPLOAD", "AWS_DEFAULT_REGION")
    aws_session_token: str = setting("", to_str, "Temporary credentials for OUTPUT_UPLOAD", secret=True)
    # Secrets that custom nodes receive through their .env files: never printed.
    aws_access_key_id: str = setting("", to_str, "Cloud storage (node .env; the monitor's, only with OUTPUT_UPLOAD)", secret=True)
    aws_secret_access_key: str = setting("", to_str, "Cloud storage (node .env; the monitor's, only with OUTPUT_UPLOAD)", secret=True)
    aws_secret_access_key_encoded: str = setting("", to_str, "Cloud storage, '/' as _SLASH_ (node .env)", secret=True)
    azure_storage_key: str = setting("", to_str, "Cloud storage (node .env)", secret=True)
    openai_api_key: str = setting("", to_str, "OpenAI key (node .env)", secret=True)
    sources: Mapping[str, str]
    secret_values: frozenset[str]

    @property
    def mock(self) -> bool:
        """True when instances run on the CPU (``MOCK_GPU=1``)."""
        return bool(self.mock_gpu == "1")

    @property
    def python(self) -> str:
        return self.comfy_python or sys.executable

    def redact(self, text: str) -> str:
        """Replace every secret value that occurs in ``text``."""
        for value in sorted(self.secret_values, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        return text

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def effective(self) -> list[dict[str, Any]]:
        """Rows for ``orchestrator config``: name, value (secrets redacted), source, help."""
        rows = []
        for f in FIELDS:
            value = getattr(self, f.attr)
            if f.secret:
                shown: Any = REDACTED if value else ""
            elif isinstance(value, Path):
                shown = str(value)
            elif isinstance(value, tuple):
                shown = list(value)
            else:
                shown = value
            rows.append({"name": f.env, "value": shown, "source": self.sources[f.env], "help": f.help})
        return rows


FIELDS: tuple[Field, ...] = tuple(
    dataclasses.replace(f.metadata[_SPEC], attr=f.name) for f in dataclasses.fields(Settings) if _SPEC in f.metadata
)
FIELDS_BY_ENV = {f.env: f for f in FIELDS}
SECRET_ENV_NAMES = frozenset(f.env for f in FIELDS if f.secret)
# Any variable whose name looks like one of these is treated as a secret when printed.
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|STORAGE_KEY|^CUT_PK_)", re.I)


def is_secret_name(name: str) -> bool:
    return name in SECRET_ENV_NAMES or bool(SECRET_NAME.search(name))


def _read_file(path: Path) -> dict[str, str]:
    try:
        text = read_config(path, what=f"settings file {path}")
    except FileNotFoundError:
        raise ConfigError(f"cannot read settings file {path}: no such file") from None
    data = load_yaml(text, name=f"settings file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid settings file {path}: expected a mapping of NAME: value")
    out: dict[str, str] = {}
    for key, value in data.items():
        name = str(key).upper()
        if name not in FIELDS_BY_ENV and not any(name in f.aliases for f in FIELDS):
            raise ConfigError(f"invalid settings file {path}: unknown setting {key!r}")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        out[name] = "" if value is None else str(value)
    return out


def load_settings(
    env: Mapping[str, str],
    flags: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build the settings. ``flags`` maps variable names to values given on the command line.

    Raises:
        ConfigError: a value does not convert; the message names the variable and the value.
    """
    flags = dict(flags or {})
    for name in flags:
        if name not in FIELDS_BY_ENV:
            raise ConfigError(f"unknown setting {name!r} in --set: see `orchestrator config`")
    file_path = config_file or (to_optional_path(env.get("ORCHESTRATOR_CONFIG", "")))
    from_file = _read_file(file_path) if file_path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in FIELDS:
        raw: str | None = None
        source = "default"
        label = f.env
        if f.env in flags:
            raw, source = flags[f.env], "flag"
        else:
            for name in (f.env, *f.aliases):
                if name in env:
                    raw, source, label = env[name], "env", name
                    break
            if raw is None:
                for name in (f.env, *f.aliases):
                    if name in from_file:
                        raw, source, label = from_file[name], "file", name
                        break
        if raw is None:
            raw = f.default
        try:
            values[f.attr] = f.parse(raw)
        except ValueError as exc:
            shown = "***" if f.secret else raw
            where = f" (in {file_path})" if source == "file" else ""
            raise ConfigError(f"invalid {label}={shown!r}{where}: {exc}") from None
        sources[f.env] = source if label == f.env else f"{source}:{label}"
    secrets = {values[f.attr] for f in FIELDS if f.secret and values[f.attr]}
    secrets |= {v for k, v in env.items() if is_secret_name(k) and len(v) >= 4}
    return Settings(**values, sources=sources, secret_values=frozenset(secrets))
