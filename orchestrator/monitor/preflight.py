"""The rules ``up`` checks before its first side effect, the monitor's own start rules first.

``orchestrator serve`` under supervisord refuses to start on :func:`check_start`'s rules (and
supervisord retries it into FATAL, silently); ``up`` calls it before it clones, installs or
starts anything, so the operator sees the same one line and exit code at once. Then
:func:`check_inputs` reads every input file already on disk (``comfy_dir_config.yaml``,
``static-models.json``, the models manifest, ``config_nodes.json``) and COMFY_ARGS against the
checked-out ComfyUI's ``comfy/cli_args.py``, naming the full path of the file at fault; ``up``
runs it again after fetching the code and shared repos (new copies), before any pip.
:func:`check_ports` runs once the GPUs are known. Kept free of the web stack.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path

from orchestrator.core.configfile import read_config
from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.plan import OWNED_FLAGS, supported_flags
from orchestrator.core.settings import Settings


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(settings: Settings) -> None:
    """Raises ConfigError when the API would listen beyond this machine without a token."""
    if not is_loopback(settings.orchestrator_listen) and not settings.orchestrator_token:
        raise ConfigError(
            f"ORCHESTRATOR_LISTEN={settings.orchestrator_listen} is reachable from other machines: "
            "set ORCHESTRATOR_TOKEN to protect the control API, or listen on 127.0.0.1"
        )


def check_start(settings: Settings) -> None:
    """Every setting rule ``orchestrator serve`` checks before it listens.

    Raises:
        ConfigError: the listen address without a token; unusable GPU metric label names.
    """
    from orchestrator.monitor.gpu_collectors import gpu_label_names

    check_listen(settings)
    if settings.gpu_metrics == "dcgm":
        gpu_label_names(settings.gpu_metrics_host_label, settings.gpu_metrics_model_label)


def check_ports(settings: Settings, indices: Iterable[int]) -> None:
    """Each instance's port (base + GPU index) is a valid port and not the monitor's.

    Raises:
        ConfigError: naming both variables.
    """
    base, monitor = settings.worker_base_comfyui_port, settings.orchestrator_port
    for index in sorted(indices):
        port = base + index
        if port > 65535:
            raise ConfigError(
                f"invalid WORKER_BASE_COMFYUI_PORT={base}: GPU {index} would listen on {port} > 65535; "
                "use a lower base port"
            )
        if port == monitor:
            raise ConfigError(
                f"ORCHESTRATOR_PORT={monitor} is also GPU {index}'s port (WORKER_BASE_COMFYUI_PORT={base} + {index}): "
                "move one of them"
            )


def unknown_flags(args: Sequence[str], known: frozenset[str]) -> list[str]:
    """The ``--flags`` of ``args`` that ``known`` (a cli_args.py's flags) lacks, in order."""
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    return [f for f in flags if f not in known]


def check_comfy_args(settings: Settings, comfy_dir: Path) -> None:
    """COMFY_ARGS sets no flag the plan owns and, with a code tree present, only flags it declares.

    Raises:
        ConfigError: naming the flag and, for an unknown one, the full path of cli_args.py.
    """
    for arg in settings.comfy_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise ConfigError(
                f"invalid COMFY_ARGS: {flag} is set by the orchestrator for each instance; "
                "remove it (ports come from WORKER_BASE_COMFYUI_PORT, directories from ROOT)"
            )
    known = supported_flags(comfy_dir)
    if known is None:
        return  # no code tree yet: checked again once it is fetched
    bad = unknown_flags(settings.comfy_args, known)
    if bad:
        raise ConfigError(
            f"invalid COMFY_ARGS: {', '.join(bad)} not declared by {comfy_dir / 'comfy' / 'cli_args.py'} "
            "(ComfyUI would exit at start); remove it or check COMFY_REPO_URL / COMFY_BRANCH"
        )


def _text(path: Path) -> str | None:
    try:
        return read_config(path)
    except FileNotFoundError:
        return None


def check_inputs(settings: Settings) -> None:
    """Every input file on disk and COMFY_ARGS, validated without writing anything.

    Raises:
        ConfigError: the first problem, in one line naming the full path of its file.
    """
    from orchestrator.provision.models.manifest import entries_from_env, manifest_path, parse_manifest
    from orchestrator.provision.models.tree import CONFIG_NAME, STATIC_NAME, parse_config, parse_static
    from orchestrator.provision.nodes.config import default_config_file, load_config

    layout = Layout(settings.root)
    check_comfy_args(settings, layout.comfy_dir)
    tree_file = layout.shared_dir / CONFIG_NAME
    text = _text(tree_file)
    if text is not None:
        parse_config(text, settings.root, name=str(tree_file))
    static_file = layout.shared_dir / STATIC_NAME
    text = _text(static_file)
    if text is not None:
        parse_static(text, name=str(static_file))
    manifest = manifest_path(settings, layout)
    text = _text(manifest)
    if text is not None:
        parse_manifest(text, name=str(manifest))
    elif settings.models_manifest is not None:
        raise ConfigError(f"invalid MODELS_MANIFEST={str(manifest)!r}: no such file")
    entries_from_env(settings)
    nodes_file = default_config_file(settings, layout)
    if nodes_file.exists():
        load_config(nodes_file)
