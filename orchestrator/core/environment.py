"""Which variables each process under supervisord gets: least privilege for secrets. Pure.

Who holds what:

- **supervisord itself** runs with :func:`base_environment` only: the allow-list below, what
  Python, ComfyUI, PyTorch and CUDA need. supervisord hands its own environment to every program
  (``os.environ.copy()`` + the program's ``environment=``), so scrubbing it at the source is the
  one place that keeps secrets away from everything it starts, including a program added later.
- **each ComfyUI instance** gets that, plus the plan's own variables (``CUDA_VISIBLE_DEVICES``…)
  and the variables the user forwards with ``INSTANCE_ENV_PASSTHROUGH``
  (:func:`passthrough_environment`), both in its ``environment=`` line. Never a secret: a
  secret-looking name listed there is refused (:func:`check_passthrough`) and a glob never
  matches one. Custom nodes get the secrets their ``env`` block declares through their ``.env``
  files (0600), written by ``up``, not through the process environment.
- **the orchestrator's own programs** (monitor, background downloads, cleanup) get the setting
  variables ``up`` was given (:func:`program_environment`) and the proxy variables, from their own
  file under ``$ROOT/.orchestrator/env/`` (0600, read by the ``machine/envexec.py`` wrapper that
  execs the program, so neither supervisord nor supervisord.conf holds them); of the secrets, each
  gets only the ones it uses (:data:`PROGRAM_SECRETS`): the monitor the control token, the
  background downloads the Hugging Face / CivitAI tokens.

This keeps secrets out of logs, crash reports and child processes of third-party code; it is not
a sandbox: every program runs as the same user, which may read the others' files (``.env``,
``supervisord.conf``, a settings file) and ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

from orchestrator.core.errors import ConfigError
from orchestrator.core.settings import FIELDS, Settings, is_secret_name

# What ComfyUI, Python, PyTorch and CUDA need (names or shell-style patterns, case-sensitive).
BASE_ALLOW = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR",
    "PYTHON*", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "LD_LIBRARY_PATH",
    "CUDA_*", "NVIDIA_*", "NCCL_*", "CUDNN_*", "TORCH_*", "PYTORCH_*", "TRITON_*", "XFORMERS_*",
    "HIP_*", "ROCR_*", "HSA_*", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    # Cache locations (paths, not credentials).
    "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
    "XDG_DATA_HOME", "XDG_RUNTIME_DIR",
    # Certificate bundles for TLS behind an intercepting proxy.
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    # The simulator's fault knobs (demo and tests); real ComfyUI ignores them.
    "SIM_*",
)
# Proxy URLs may carry credentials: the orchestrator's programs get them, instances only when forwarded.
PROXY_NAMES = (
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
)
# Secrets each orchestrator program may hold; every other secret setting is kept from it.
PROGRAM_SECRETS: Mapping[str, frozenset[str]] = {
    "monitor": frozenset({"ORCHESTRATOR_TOKEN"}),
    "models": frozenset({"HF_TOKEN", "CIVITAI_TOKEN"}),
    "queue": frozenset({"JOB_QUEUE_URL", "ORCHESTRATOR_TOKEN"}),
}
# The monitor's extra secrets when OUTPUT_UPLOAD is set.
UPLOAD_SECRETS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
_PATTERN = re.compile(r"[A-Za-z_*?\[\]][A-Za-z0-9_*?\[\]!-]*")


def is_secret(name: str) -> bool:
    """A variable no instance may receive: a secret setting, a secret-looking name, SSH material."""
    return is_secret_name(name) or name.upper().startswith("SSH_")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def base_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """supervisord's own environment: the allow-listed variables of ``environ``, no secret."""
    return {k: v for k, v in environ.items() if _matches(k, BASE_ALLOW) and not is_secret(k)}


def check_passthrough(patterns: Iterable[str]) -> None:
    """Refuse a malformed entry or a secret name in INSTANCE_ENV_PASSTHROUGH.

    Raises:
        ConfigError: one line naming the entry and what to do.
    """
    for p in patterns:
        if not _PATTERN.fullmatch(p):
            raise ConfigError(
                f"invalid INSTANCE_ENV_PASSTHROUGH entry {p!r}: expected a variable name or a glob such as MY_APP_*"
            )
        if not any(c in p for c in "*?[") and is_secret(p):
            raise ConfigError(
                f"invalid INSTANCE_ENV_PASSTHROUGH entry {p}: instances never receive secrets; give a custom node "
                "its secret through the env block of config_nodes.json (its .env file)"
            )


def passthrough_environment(environ: Mapping[str, str], patterns: Iterable[str]) -> dict[str, str]:
    """The variables of ``environ`` the user forwards to instances; secret names never match.

    Raises:
        ConfigError: see :func:`check_passthrough`.
    """
    patterns = tuple(patterns)
    check_passthrough(patterns)
    return {k: v for k, v in environ.items() if _matches(k, patterns) and not is_secret(k)}


def _setting_names() -> dict[str, bool]:
    """Every variable a setting is read from (names and old names) → whether it is a secret."""
    names = {"ORCHESTRATOR_CONFIG": False}
    for f in FIELDS:
        for name in (f.env, *f.aliases):
            names[name] = f.secret
    return names


def program_environment(
    settings: Settings, environ: Mapping[str, str], overrides: Mapping[str, str], program: str
) -> dict[str, str]:
    """What one orchestrator program (``monitor``, ``models``, ``cleanup``) gets on top of the base:
    the setting variables `up` saw (environment and flags) and the proxies, with only its own secrets.

    Settings from a settings file reach it through ORCHESTRATOR_CONFIG (the program reads the file).
    """
    names = _setting_names()
    keep = PROGRAM_SECRETS.get(program, frozenset())
    if program == "monitor" and settings.output_upload:
        keep = keep | UPLOAD_SECRETS  # it uploads the jobs' outputs
    env = {k: v for k, v in environ.items() if k in PROXY_NAMES}
    for source in (environ, overrides):
        env.update({k: v for k, v in source.items() if k in names and (not names[k] or k in keep)})
    env["ROOT"] = str(settings.root)
    return env
