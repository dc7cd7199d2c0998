"""The supervisord XML-RPC client: per-connection timeouts, never the process-wide default."""

from __future__ import annotations

import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

import pytest
from support import wait_until

from orchestrator.core.errors import SupervisorError
from orchestrator.core.layout import Layout
from orchestrator.machine.supervisor import Supervisor


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer, SimpleXMLRPCDispatcher):
    daemon_threads = True
    logRequests = False

    def __init__(self, path: str) -> None:
        socketserver.UnixStreamServer.__init__(self, path, _Handler)
        SimpleXMLRPCDispatcher.__init__(self, allow_none=True, encoding=None)


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ()  # any path
    disable_nagle_algorithm = False  # no TCP options on a unix socket

    def address_string(self) -> str:  # unix sockets have no (host, port)
        return "unix"

    def log_message(self, *args: object) -> None:
        pass


class FakeSupervisord:
    """An XML-RPC server on a unix socket; ``supervisor.getPID`` records the process-wide default
    timeout seen while a call is in flight, ``supervisor.stopProcess`` blocks until released."""

    def __init__(self, layout: Layout) -> None:
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        layout.supervisord_conf.write_text("[unix_http_server]\nusername = u\npassword = p\n")
        self.defaults_seen: list[float | None] = []
        self.stop_entered = threading.Event()
        self.release = threading.Event()
        self.server = _Server(str(layout.socket))
        self.server.register_function(self._get_pid, "supervisor.getPID")
        self.server.register_function(self._stop, "supervisor.stopProcess")  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _get_pid(self) -> int:
        self.defaults_seen.append(socket.getdefaulttimeout())
        return 4242

    def _stop(self, name: str, wait: bool) -> bool:
        self.stop_entered.set()
        self.release.wait(60)
        return True

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[tuple[Layout, FakeSupervisord]]:
    # A short root so the socket path fits AF_UNIX limits.
    with tempfile.TemporaryDirectory(prefix="sv") as d:
        layout = Layout(Path(d))
        server = FakeSupervisord(layout)
        try:
            yield layout, server
        finally:
            server.close()


def test_call_does_not_touch_the_process_wide_default_timeout(fake: tuple[Layout, FakeSupervisord]) -> None:
    layout, server = fake
    before = socket.getdefaulttimeout()
    assert Supervisor(layout, timeout=3.0).pid() == 4242
    # While the call was in flight, other threads (here: the server thread) saw the old default.
    assert server.defaults_seen == [before]
    assert socket.getdefaulttimeout() == before


def test_short_call_does_not_shorten_a_concurrent_long_call(fake: tuple[Layout, FakeSupervisord]) -> None:
    layout, server = fake
    before = socket.getdefaulttimeout()
    long_sup = Supervisor(layout, timeout=40.0)
    errors: list[BaseException] = []

    def long_call() -> None:
        try:
            long_sup.stop("comfyui_gpu0", wait=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=long_call, daemon=True)
    t.start()
    assert server.stop_entered.wait(30)
    # A short probe in another thread while the long call is in flight.
    assert Supervisor(layout, timeout=0.5).pid() == 4242
    assert server.defaults_seen == [before]
    conn = long_sup._server()("transport").connection
    assert conn is not None
    assert conn.sock is not None
    assert conn.sock.gettimeout() == 40.0
    server.release.set()
    t.join(30)
    assert not t.is_alive()
    assert errors == []
    assert socket.getdefaulttimeout() == before


def test_short_timeout_applies_to_its_own_socket(fake: tuple[Layout, FakeSupervisord]) -> None:
    layout, server = fake
    before = socket.getdefaulttimeout()
    result: list[BaseException] = []

    def call() -> None:
        try:
            Supervisor(layout, timeout=0.3).stop("comfyui_gpu0")
        except SupervisorError as exc:
            result.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    # The server never answers until released; the client gives up on its own 0.3 s timeout.
    assert wait_until(lambda: not t.is_alive(), 30)
    assert result
    assert "did not answer" in str(result[0])
    assert socket.getdefaulttimeout() == before
    assert os.path.exists(layout.socket)


def test_wait_for_polls_on_the_given_clock_and_asks_once_more_at_the_deadline() -> None:
    from orchestrator.machine.clock import wait_for

    now = [0.0]
    answers = iter([False, False, True])
    assert wait_for(lambda: next(answers), 10, 1, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert now[0] == 2.0
    now[0] = 0.0
    calls: list[float] = []

    def never() -> bool:
        calls.append(now[0])
        return False

    assert not wait_for(never, 3, 1, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert calls == [0.0, 1.0, 2.0, 3.0]
