"""Typed, frozen settings built once at the edge.

Precedence: flag (``--set NAME=VALUE`` and dedicated flags) > environment > YAML settings file
(``--config FILE`` or ``ORCHESTRATOR_CONFIG``) > default. Every field has a pure converter that
raises ``ValueError`` with what it expected; :func:`load_settings` turns that into a one-line
:class:`ConfigError` naming the variable and the value.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.core.configfile import load_yaml, read_config
from orchestrator.core.errors import ConfigError

FORK_URL = "https://github.com/stakeordie/ComfyUI.git"
UPSTREAM_URL = "https://github.com/comfyanonymous/ComfyUI.git"
SHARED_URL = "https://github.com/stakeordie/emprops_shared.git"
PINNED_COMMIT = "02a1b01aad28470f06c8b4f95b90914413d3e4c8"

REDACTED = "***"


# ---------------------------------------------------------------- converters (pure)
def to_str(raw: str) -> str:
    return raw.strip()


def to_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false (1/0, yes/no, on/off)")


def to_port(raw: str) -> int:
    try:
        port = int(raw.strip())
    except ValueError:
        raise ValueError("expected a port number 1-65535") from None
    if not 1 <= port <= 65535:
        raise ValueError("expected a port number 1-65535")
    return port


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        expected = f"expected an integer >= {lo}" if hi is None else f"expected an integer {lo}-{hi}"
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(expected) from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(expected)
        return value

    return convert


def to_optional_count(raw: str) -> int | None:
    if not raw.strip():
        return None
    return _int_in(1, 1024)(raw)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def to_duration(raw: str) -> float:
    """Seconds; accepts ``30``, ``2.5s``, ``15m``, ``1h``, ``500ms``."""
    match = _DURATION.match(raw)
    if not match:
        raise ValueError("expected a duration such as 30, 30s, 15m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def to_positive_duration(raw: str) -> float:
    value = to_duration(raw)
    if value <= 0:
        raise ValueError("expected a duration greater than 0 such as 5s")
    return value


def to_mock_gpu(raw: str) -> str:
    value = raw.strip().lower()
    if value in {"auto"}:
        return "auto"
    try:
        return "1" if to_bool(value) else "0"
    except ValueError:
        raise ValueError("expected 1 (mock GPUs), 0 (real GPUs) or auto") from None


def to_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def to_args(raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise ValueError(f"expected shell-style arguments ({exc})") from None


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return convert


def _expand(value: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise ValueError("expected a path (the user after ~ does not exist)") from None


def to_path(raw: str) -> Path:
    value = raw.strip()
    if not value:
        raise ValueError("expected a path")
    return _expand(value)


def to_optional_path(raw: str) -> Path | None:
    return _expand(raw.strip()) if raw.strip() else None


def to_listen(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[0-9A-Za-z.:\-\[\]]+", value):
        raise ValueError("expected an IP address or host name such as 127.0.0.1")
    return value


# ---------------------------------------------------------------- the fields
@dataclasses.dataclass(frozen=True)
class Field:
    env: str
    default: str
    convert: Callable[[str], Any]
    help: str
    aliases: tuple[str, ...] = ()
    secret: bool = False

    @property
    def attr(self) -> str:
        return self.env.lower()


FIELDS: tuple[Field, ...] = (
    Field("ROOT", "/workspace", to_path, "Root of everything the orchestrator writes"),
    Field("MOCK_GPU", "0", to_mock_gpu, "1: k CPU instances instead of GPUs; auto: mock only when no driver"),
    Field("NUM_GPUS", "", to_optional_count, "Mock: number of instances (default 1); real: cap on GPUs used", ("TEST_GPUS",)),
    Field("GPUS", "", to_list, "Subset of GPUs to run, by index or UUID (e.g. 0,2)"),
    Field("MOCK_GPU_MEMORY_MB", "24576", _int_in(1), "Memory each mock GPU reports, in MiB"),
    Field("COMFY_REPO_URL", FORK_URL, to_str, "ComfyUI repository (the fork follows COMFY_BRANCH, others COMFY_COMMIT)"),
    Field("COMFY_BRANCH", "forward", to_str, "Branch of the fork to follow"),
    Field("COMFY_COMMIT", PINNED_COMMIT, to_str, "Commit for non-fork repositories and the fallback"),
    Field("COMFY_FALLBACK_URL", UPSTREAM_URL, to_str, "Repository used at COMFY_COMMIT when COMFY_REPO_URL cannot be cloned"),
    Field("COMFY_ON_MISSING_BRANCH", "fail", _choice("fail", "fallback"), "COMFY_BRANCH not in the fork: fail (exit 1), or fallback (keep the tree, or COMFY_FALLBACK_URL on a first boot)"),
    Field("COMFY_UPDATE", "interval", _choice("always", "never", "interval"), "When `up` fetches the ComfyUI branch and the shared repo: every boot, never once cloned, or after COMFY_UPDATE_INTERVAL"),
    Field("COMFY_UPDATE_INTERVAL", "1h", to_duration, "With COMFY_UPDATE=interval: seconds since the last fetch before `up` fetches again"),
    Field("COMFY_ARGS", "", to_args, "Extra ComfyUI flags for every instance", ("COMFY_FLAGS",)),
    Field("COMFY_PYTHON", "", to_str, "Interpreter that runs ComfyUI's main.py (default: the orchestrator's)"),
    Field("WORKER_BASE_COMFYUI_PORT", "8188", to_port, "Instance N listens on this port + N"),
    Field("SHARED_REPO_URL", SHARED_URL, to_str, "Shared config repository (empty: use the shipped defaults)"),
    Field("SHARED_BRANCH", "", to_str, "Branch of the shared repo to follow (empty: its default branch)"),
    Field("SHARED_COMMIT", "", to_str, "Pin the shared repo to this commit"),
    Field("STORAGE_TEST_MODE", "false", to_bool, "Use config_nodes_test.json", ("AWS_TEST_MODE", "AZURE_TEST_MODE")),
    Field("CUT_PK_1", "", to_str, "SSH private key, base64, part 1", secret=True),
    Field("CUT_PK_2", "", to_str, "SSH private key, base64, part 2", secret=True),
    Field("CUT_PK_3", "", to_str, "SSH private key, base64, part 3", secret=True),
    Field("SSH_PRIVATE_KEY", "", to_str, "SSH private key (PEM/OpenSSH text or base64)", secret=True),
    Field("GIT_TIMEOUT", "300s", to_positive_duration, "Timeout of one git network operation"),
    Field("NODES_CONCURRENCY", "8", _int_in(1, 64), "Parallel custom-node clones/updates"),
    Field("NODE_TIMEOUT", "600s", to_positive_duration, "Timeout per custom node (clone, script)"),
    Field("PIP_TIMEOUT", "1800s", to_positive_duration, "Timeout of the combined requirements install"),
    Field("HF_TOKEN", "", to_str, "Hugging Face token (bearer)", secret=True),
    Field("CIVITAI_TOKEN", "", to_str, "CivitAI token", secret=True),
    Field("MODELS_MANIFEST", "", to_optional_path, "Model manifest (default: models.yaml in the shared repo)"),
    Field("MODELS_CONCURRENCY", "4", _int_in(1, 64), "Parallel model downloads"),
    Field("CIVITAI_MODELS", "", to_list, "CivitAI version ids → checkpoints"),
    Field("CIVITAI_LORAS", "", to_list, "CivitAI version ids → loras"),
    Field("CIVITAI_VAES", "", to_list, "CivitAI version ids → vae"),
    Field("CIVITAI_FLUX", "", to_list, "CivitAI version ids → diffusion_models"),
    Field("HUGGINGFACE_MODELS", "", to_list, "Hugging Face files (owner/repo/path) or whole repos (owner/repo)"),
    Field("HF_ENDPOINT", "https://huggingface.co", to_str, "Hugging Face server (HF_TOKEN is sent only to this host)"),
    Field("CIVITAI_ENDPOINT", "https://civitai.com", to_str, "CivitAI server (CIVITAI_TOKEN is sent only to this host)"),
    Field("CLEANUP_INTERVAL", "15m", to_positive_duration, "How often old outputs are deleted"),
    Field("OUTPUT_MAX_AGE", "60m", to_duration, "Outputs older than this are deleted (0: off)"),
    Field("ORCHESTRATOR_LISTEN", "127.0.0.1", to_listen, "Monitor HTTP address"),
    Field("ORCHESTRATOR_PORT", "9090", to_port, "Monitor HTTP port"),
    Field("ORCHESTRATOR_TOKEN", "", to_str, "Bearer token for mutating endpoints", secret=True),
    Field("PROBE_INTERVAL", "5s", to_positive_duration, "Seconds between health probes"),
    Field("PROBE_TIMEOUT", "3s", to_positive_duration, "Timeout of one probe"),
    Field("STARTUP_TIMEOUT", "600s", to_positive_duration, "An instance not ready after this is restarted"),
    Field("UNHEALTHY_THRESHOLD", "3", _int_in(1, 100), "Consecutive failed probes before a restart"),
    Field("MIN_READY_INSTANCES", "", to_optional_count, "/readyz is 200 with at least this many READY (default: all)"),
    Field("GPU_METRICS", "dcgm", _choice("dcgm", "off"), "Export dcgm-exporter style GPU gauges"),
    Field("GPU_METRICS_HOST_LABEL", "Hostname", to_str, "Name of the host label on GPU gauges"),
    Field("GPU_METRICS_MODEL_LABEL", "model_name", to_str, "GPU model label (modelName: as dcgm-exporter)"),
    Field("GPU_SAMPLE_INTERVAL", "5s", to_positive_duration, "NVML sampling interval"),
    Field("MAX_QUEUE_DEPTH", "8", _int_in(1, 10000), "Jobs are refused (503) when every ready instance has this many"),
    Field("READYZ_SATURATION", "false", to_bool, "/readyz reports not ready while every instance is saturated"),
    Field("JOB_TIMEOUT", "600s", to_positive_duration, "Default job deadline"),
    Field("JOB_RESULTS_MAX", "1000", _int_in(1), "Finished jobs kept for GET /jobs/{id}"),
    Field("JOB_RESULTS_TTL", "1h", to_positive_duration, "How long finished jobs are kept"),
    Field("MAX_REQUEST_BYTES", "67108864", _int_in(1), "Largest POST /jobs body in bytes (413 above; 64 MiB fits base64 images)"),
    Field("STOP_TIMEOUT", "10s", to_positive_duration, "Graceful stop time per instance before SIGKILL"),
    Field("LOG_FORMAT", "text", _choice("text", "json"), "Log format"),
    Field("LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"), "Log level"),
    # Secrets that custom nodes receive through their .env files: never printed.
    Field("AWS_ACCESS_KEY_ID", "", to_str, "Cloud storage (node .env)", secret=True),
    Field("AWS_SECRET_ACCESS_KEY", "", to_str, "Cloud storage (node .env)", secret=True),
    Field("AWS_SECRET_ACCESS_KEY_ENCODED", "", to_str, "Cloud storage, '/' as _SLASH_ (node .env)", secret=True),
    Field("AZURE_STORAGE_KEY", "", to_str, "Cloud storage (node .env)", secret=True),
    Field("OPENAI_API_KEY", "", to_str, "OpenAI key (node .env)", secret=True),
)

FIELDS_BY_ENV = {f.env: f for f in FIELDS}
SECRET_ENV_NAMES = frozenset(f.env for f in FIELDS if f.secret)
# Any variable whose name looks like one of these is treated as a secret when printed.
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|STORAGE_KEY|^CUT_PK_)", re.I)


def is_secret_name(name: str) -> bool:
    return name in SECRET_ENV_NAMES or bool(SECRET_NAME.search(name))


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective settings. Attribute names are the variable names in lower case."""

    root: Path
    mock_gpu: str
    num_gpus: int | None
    gpus: tuple[str, ...]
    mock_gpu_memory_mb: int
    comfy_repo_url: str
    comfy_branch: str
    comfy_commit: str
    comfy_fallback_url: str
    comfy_on_missing_branch: str
    comfy_update: str
    comfy_update_interval: float
    comfy_args: tuple[str, ...]
    comfy_python: str
    worker_base_comfyui_port: int
    shared_repo_url: str
    shared_branch: str
    shared_commit: str
    storage_test_mode: bool
    cut_pk_1: str
    cut_pk_2: str
    cut_pk_3: str
    ssh_private_key: str
    git_timeout: float
    nodes_concurrency: int
    node_timeout: float
    pip_timeout: float
    hf_token: str
    civitai_token: str
    models_manifest: Path | None
    models_concurrency: int
    civitai_models: tuple[str, ...]
    civitai_loras: tuple[str, ...]
    civitai_vaes: tuple[str, ...]
    civitai_flux: tuple[str, ...]
    huggingface_models: tuple[str, ...]
    hf_endpoint: str
    civitai_endpoint: str
    cleanup_interval: float
    output_max_age: float
    orchestrator_listen: str
    orchestrator_port: int
    orchestrator_token: str
    probe_interval: float
    probe_timeout: float
    startup_timeout: float
    unhealthy_threshold: int
    min_ready_instances: int | None
    gpu_metrics: str
    gpu_metrics_host_label: str
    gpu_metrics_model_label: str
    gpu_sample_interval: float
    max_queue_depth: int
    readyz_saturation: bool
    job_timeout: float
    job_results_max: int
    job_results_ttl: float
    max_request_bytes: int
    stop_timeout: float
    log_format: str
    log_level: str
    aws_access_key_id: str
    aws_secret_access_key: str
    aws_secret_access_key_encoded: str
    azure_storage_key: str
    openai_api_key: str
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
            if "\0" in raw:
                raise ValueError("a value may not contain a NUL byte")
            values[f.attr] = f.convert(raw)
        except ValueError as exc:
            shown = "***" if f.secret else raw
            where = f" (in {file_path})" if source == "file" else ""
            raise ConfigError(f"invalid {label}={shown!r}{where}: {exc}") from None
        sources[f.env] = source if label == f.env else f"{source}:{label}"
    secrets = {values[f.attr] for f in FIELDS if f.secret and values[f.attr]}
    secrets |= {v for k, v in env.items() if is_secret_name(k) and len(v) >= 4}
    return Settings(**values, sources=sources, secret_values=frozenset(secrets))
