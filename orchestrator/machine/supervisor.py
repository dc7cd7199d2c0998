"""Talking to supervisord over XML-RPC on its unix socket (never parsing supervisorctl text)."""

from __future__ import annotations

import base64
import configparser
import http.client
import json
import socket
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import Faults

from orchestrator.core.errors import SupervisorError
from orchestrator.core.layout import Layout
from orchestrator.core.states import ProcessInfo
from orchestrator.machine.fs import write_json

NOT_RUNNING = "supervisord is not running: run `orchestrator up`"


def auth_file(layout: Layout) -> Path:
    """The control socket's credentials (mode 0600), written by ``up``: clients never parse the conf."""
    return layout.state_dir / "supervisor.auth"


def write_credentials(layout: Layout, username: str, password: str) -> None:
    write_json(auth_file(layout), {"username": username, "password": password}, mode=0o600)


def _credentials_from_auth_file(path: Path) -> tuple[str, str] | None:
    """The pair from the auth file; None when there is none.

    Raises:
        SupervisorError: the file exists but is damaged (one line naming it and the recovery).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SupervisorError(f"cannot read {path} ({exc.strerror}): run `orchestrator up`") from None
    try:
        data = json.loads(raw)
    except ValueError:  # garbage bytes (UnicodeDecodeError) included
        data = None
    if isinstance(data, dict):
        user, password = data.get("username"), data.get("password")
        if isinstance(user, str) and isinstance(password, str) and user and password:
            return user, password
    raise SupervisorError(f"{path} is damaged: run `orchestrator up` to rewrite it")


def _credentials_from_conf(layout: Layout) -> tuple[str, str] | None:
    """The pair from a supervisord.conf written before the auth file existed; None when unreadable."""
    parser = configparser.RawConfigParser()
    try:
        if not parser.read(layout.supervisord_conf, encoding="utf-8"):
            return None
        return parser.get("unix_http_server", "username"), parser.get("unix_http_server", "password")
    except (configparser.Error, OSError, ValueError):
        return None


def read_credentials(layout: Layout) -> tuple[str, str]:
    """Username and password for the control socket, from the auth file ``up`` writes.

    A supervisord started before that file existed is still reached through its conf's copy.
    """
    try:
        found = _credentials_from_auth_file(auth_file(layout))
    except SupervisorError:
        legacy = _credentials_from_conf(layout)
        if legacy is None:
            raise
        return legacy
    if found is not None:
        return found
    legacy = _credentials_from_conf(layout)
    if legacy is not None:
        return legacy
    if not layout.supervisord_conf.exists():
        raise SupervisorError(NOT_RUNNING)
    raise SupervisorError(f"cannot read {auth_file(layout)} or {layout.supervisord_conf}: run `orchestrator up`")


def socket_in_use(path: Path, timeout: float = 2.0) -> bool:
    """Whether some process listens on the unix socket ``path``.

    A slow or stopped supervisord still does: the kernel queues the connection. Only a refused
    connection (or no file) means nobody is there; a connection that times out counts as in use.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    finally:
        sock.close()
    return True


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over supervisord's unix socket, with the timeout set on this connection's own socket.

    The process-wide ``socket.setdefaulttimeout`` is never touched: a short probe in one thread must
    not shorten (or lengthen) a long restart call in another.
    """

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's unix socket with basic auth; each connection carries its own timeout.

    One kept-alive connection per transport, as :class:`xmlrpc.client.Transport` does for TCP.
    """

    def __init__(self, username: str, password: str, path: str, timeout: float) -> None:
        super().__init__()
        self.path = path
        self.timeout = timeout
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._auth = [("Authorization", f"Basic {token}")]

    @property
    def connection(self) -> http.client.HTTPConnection | None:
        """The open connection, if any."""
        return self._connection[1]

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        cached_host, cached = self._connection
        if cached is not None and cached_host == host:
            return cached
        self._extra_headers = list(self._auth)  # sent with every request on this connection
        connection = _UnixConnection(self.path, self.timeout)
        self._connection = host, connection
        return connection


class Supervisor:
    """A thin client. Every call raises :class:`SupervisorError` with a one-line message."""

    def __init__(self, layout: Layout, timeout: float = 10.0) -> None:
        self.layout = layout
        self.timeout = timeout
        self._proxy: Any = None

    def _server(self) -> Any:
        if self._proxy is None:
            if not self.layout.socket.exists():
                raise SupervisorError(NOT_RUNNING)
            user, password = read_credentials(self.layout)
            transport = UnixTransport(user, password, str(self.layout.socket), self.timeout)
            self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return self._proxy

    def _call(self, method: str, *args: Any) -> Any:
        try:
            target = self._server()
            for part in method.split("."):
                target = getattr(target, part)
            return target(*args)
        except xmlrpc.client.Fault as fault:
            raise SupervisorError(_fault_message(fault, args)) from None
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            self._proxy = None
            if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
                raise SupervisorError(NOT_RUNNING) from None
            raise SupervisorError(f"supervisord did not answer: {exc}") from None

    def is_running(self) -> bool:
        try:
            return bool(self._call("supervisor.getState")["statename"] == "RUNNING")
        except SupervisorError:
            return False

    def require_running(self) -> None:
        """Raise the reason supervisord cannot be used (not running, a damaged auth file…)."""
        state = self._call("supervisor.getState")["statename"]
        if state != "RUNNING":
            raise SupervisorError(f"supervisord is {str(state).lower()}: run `orchestrator up`")

    def pid(self) -> int:
        return int(self._call("supervisor.getPID"))

    def processes(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_rpc(i) for i in self._call("supervisor.getAllProcessInfo")]

    def process(self, name: str) -> ProcessInfo:
        return ProcessInfo.from_rpc(self._call("supervisor.getProcessInfo", name))

    def start(self, name: str, wait: bool = False) -> None:
        try:
            self._call("supervisor.startProcess", name, wait)
        except SupervisorError as exc:
            if "already started" not in str(exc):
                raise

    def stop(self, name: str, wait: bool = True) -> None:
        try:
            self._call("supervisor.stopProcess", name, wait)
        except SupervisorError as exc:
            if "not running" not in str(exc):
                raise

    def stop_all(self) -> None:
        self._call("supervisor.stopAllProcesses", True)

    def restart(self, name: str) -> None:
        """Stop the process group (waiting for it), then start it again without waiting."""
        self.stop(name, wait=True)
        self.start(name, wait=False)

    def signal(self, name: str, sig: str) -> None:
        self._call("supervisor.signalProcess", name, sig)

    def reload_config(self) -> tuple[list[str], list[str], list[str]]:
        """Re-read supervisord.conf; returns (added, changed, removed) program groups."""
        result = self._call("supervisor.reloadConfig")
        added, changed, removed = result[0]
        return list(added), list(changed), list(removed)

    def add_group(self, name: str) -> None:
        self._call("supervisor.addProcessGroup", name)

    def remove_group(self, name: str) -> None:
        self._call("supervisor.removeProcessGroup", name)

    def read_log(self, name: str, offset: int, length: int) -> tuple[str, int, bool]:
        data, off, overflow = self._call("supervisor.tailProcessStdoutLog", name, offset, length)
        return str(data), int(off), bool(overflow)

    def shutdown(self) -> None:
        self._call("supervisor.shutdown")


def _fault_message(fault: xmlrpc.client.Fault, args: tuple[Any, ...]) -> str:
    name = args[0] if args else ""
    messages = {
        Faults.BAD_NAME: f"no program {name!r} in supervisord: run `orchestrator up` to apply the plan",
        Faults.ALREADY_STARTED: f"{name} already started",
        Faults.NOT_RUNNING: f"{name} not running",
        Faults.SPAWN_ERROR: f"{name} could not be spawned (see `orchestrator logs`)",
        Faults.ABNORMAL_TERMINATION: f"{name} exited during start (see `orchestrator logs`)",
        Faults.SHUTDOWN_STATE: "supervisord is shutting down",
    }
    return messages.get(fault.faultCode, f"supervisord: {fault.faultString}")

