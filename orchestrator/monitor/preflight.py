"""The rules the monitor enforces when it starts, as one function ``up`` runs first.

``orchestrator serve`` under supervisord refuses to start on these (and supervisord retries it into
FATAL, silently); ``up`` calls :func:`check_start` before it clones, installs or starts anything,
so the operator sees the same one line and exit code at once. Kept free of the web stack.
"""

from __future__ import annotations

import ipaddress

from orchestrator.core.errors import ConfigError
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
    from orchestrator.monitor.collectors import gpu_label_names

    check_listen(settings)
    if settings.gpu_metrics == "dcgm":
        gpu_label_names(settings.gpu_metrics_host_label, settings.gpu_metrics_model_label)
