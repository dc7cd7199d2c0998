"""``orchestrator health``: the container health check, one GET on the local monitor.

Kept small and separate from the monitor's web stack: a container runtime runs it every few
seconds, so it imports only ``requests``. ``--live`` also reads the monitor's heartbeat file
(``machine.watchdog``): a monitor whose probe loop is stuck fails it even while its port answers.
"""

from __future__ import annotations

import dataclasses

import requests

from orchestrator.core.settings import Settings


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    """What the monitor answered: ``ok`` (HTTP 200) and one line saying why."""

    ok: bool
    message: str


def local_host(listen: str) -> str:
    """Where a local client reaches a server listening on ``listen``."""
    if listen in {"0.0.0.0", ""}:  # noqa: S104 - compared, not bound
        return "127.0.0.1"
    if listen in {"::", "[::]"}:
        return "[::1]"
    return f"[{listen}]" if ":" in listen and not listen.startswith("[") else listen


def check_health(settings: Settings, *, live: bool, timeout: float = 0.9) -> HealthCheck:
    """GET /readyz (or /healthz with ``live``) on the local monitor, within ``timeout`` seconds.

    With ``live``, a heartbeat older than ``machine.watchdog.stale_after`` fails first (no
    heartbeat file at all is left to the HTTP answer: a monitor that never started).
    """
    if live and (stale := _stale_heartbeat(settings)):
        return HealthCheck(False, f"not alive: {stale}")
    path = "/healthz" if live else "/readyz"
    url = f"http://{local_host(settings.orchestrator_listen)}:{settings.orchestrator_port}{path}"
    with requests.Session() as session:
        session.trust_env = False  # a local address: no proxies from the environment
        try:
            resp = session.get(url, timeout=timeout)
        except requests.RequestException as exc:
            return HealthCheck(False, f"monitor not answering at {url}: {_reason(exc)}")
    try:
        data = resp.json()
        detail = str(data.get("reason", "")) if isinstance(data, dict) else ""
    except ValueError:
        detail = ""
    ok = resp.status_code == 200
    word = ("alive" if live else "ready") if ok else ("not alive" if live else "not ready")
    return HealthCheck(ok, settings.redact(f"{word}: {detail}" if detail else f"{word} (HTTP {resp.status_code})"))


def _stale_heartbeat(settings: Settings) -> str:
    """Why the monitor's heartbeat is stale, or ""."""
    from orchestrator.core.layout import Layout
    from orchestrator.machine.watchdog import heartbeat_age, heartbeat_path, stale_after

    path = heartbeat_path(Layout(settings.root))
    age = heartbeat_age(path)
    bound = stale_after(settings.probe_interval, settings.probe_timeout)
    if age is None or age <= bound:
        return ""
    return f"the monitor's heartbeat ({path}) is {age:.0f}s old (bound {bound:.0f}s): its probe loop is stuck"


def _reason(exc: BaseException) -> str:
    """The innermost cause of a failed request (e.g. ``[Errno 111] Connection refused``)."""
    seen = [exc]
    while (cause := seen[-1].__cause__ or seen[-1].__context__) is not None and cause not in seen:
        seen.append(cause)
    return str(seen[-1])
