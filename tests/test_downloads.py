"""The download engine against a real local HTTP server with Range support and fault modes."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.server
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli.logconfig import setup_logging
from orchestrator.core.disk import parse_size, to_disk_floor
from orchestrator.core.errors import ConfigError
from orchestrator.core.settings import load_settings
from orchestrator.machine.fs import read_json
from orchestrator.machine.ports import free_port_block
from orchestrator.provision.models import downloads, partfile, responses, status, verified
from orchestrator.provision.models.downloads import Engine
from orchestrator.provision.models.sync import download_options
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask
from orchestrator.provision.models.verified import VERIFIED_FILE


# ---------------------------------------------------------------- the test server
@dataclasses.dataclass
class FileSpec:
    """How the server answers for one path."""

    data: bytes = b""
    token: str | None = None  # required bearer token
    ignore_range: bool = False  # answer 200 with the whole file to Range requests
    drop_after: int | None = None  # close the connection after this many body bytes...
    drops: int = 1  # ...for this many requests
    rate: float | None = None  # bytes per second
    disposition: str | None = None  # Content-Disposition value
    fail_first: int = 0  # answer 503 to this many requests first
    status: int | None = None  # always answer this status
    json: Any = None  # answer this JSON instead of data
    redirect: str | None = None  # answer 302 to this location
    etag: str | None = '"v1"'
    accept_ranges: bool = True  # say Accept-Ranges: bytes


class RangeServer:
    """A threaded HTTP/1.1 server: Range, If-Range, bearer auth, drops, throttling, 503s, redirects."""

    def __init__(self) -> None:
        self.files: dict[str, FileSpec] = {}
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._active = 0
        self.max_active = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                entry = {
                    "path": path,
                    "query": self.path.partition("?")[2],
                    "range": self.headers.get("Range"),
                    "auth": self.headers.get("Authorization"),
                    "host": self.headers.get("Host"),
                    "client": self.client_address[1],  # the client's port: one per connection
                    "status": 0,
                    "sent": 0,
                }
                with server._lock:
                    server.requests.append(entry)
                    server._active += 1
                    server.max_active = max(server.max_active, server._active)
                    spec = server.files.get(path)
                    count = sum(1 for r in server.requests if r["path"] == path)
                try:
                    self._answer(spec, entry, count, head)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    with server._lock:
                        server._active -= 1

            def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _answer(self, spec: FileSpec | None, entry: dict[str, Any], count: int, head: bool) -> None:
                if spec is None:
                    entry["status"] = 404
                    return self._send(404, {}, b"not found")
                if spec.token is not None and self.headers.get("Authorization") != f"Bearer {spec.token}":
                    entry["status"] = 401
                    return self._send(401, {"Content-Type": "application/json"}, b'{"error":"unauthorized"}')
                if spec.status is not None:
                    entry["status"] = spec.status
                    return self._send(spec.status, {}, b"nope")
                if count <= spec.fail_first:
                    entry["status"] = 503
                    return self._send(503, {"Retry-After": "0"}, b"busy")
                if spec.redirect is not None:
                    entry["status"] = 302
                    return self._send(302, {"Location": spec.redirect})
                if spec.json is not None:
                    import json as _json

                    entry["status"] = 200
                    return self._send(200, {"Content-Type": "application/json"}, _json.dumps(spec.json).encode())
                data = spec.data
                start, end, status = 0, len(spec.data), 200
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if rng and not spec.ignore_range and (if_range is None or if_range == spec.etag):
                    m = re.match(r"bytes=(\d+)-(\d*)$", rng)
                    if m:
                        start = int(m.group(1))
                        if start >= len(data):
                            entry["status"] = 416
                            return self._send(416, {"Content-Range": f"bytes */{len(data)}"})
                        status = 206
                        if m.group(2):
                            end = min(int(m.group(2)) + 1, len(data))
                body = data[start:end]
                headers = {"Content-Type": "application/octet-stream"}
                if spec.accept_ranges:
                    headers["Accept-Ranges"] = "bytes"
                if spec.etag:
                    headers["ETag"] = spec.etag
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                if spec.disposition:
                    headers["Content-Disposition"] = spec.disposition
                entry["status"] = status
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return None
                drop = spec.drop_after if (spec.drop_after is not None and count <= spec.drops) else None
                piece = 64 * 1024
                pos = 0
                while pos < len(body):
                    n = piece
                    if drop is not None:
                        n = min(n, drop - entry["sent"])
                        if n <= 0:
                            self.wfile.flush()
                            self.connection.shutdown(socket.SHUT_RDWR)
                            self.close_connection = True
                            return None
                    chunk = body[pos : pos + n]
                    self.wfile.write(chunk)
                    pos += len(chunk)
                    entry["sent"] += len(chunk)
                    if spec.rate:
                        time.sleep(len(chunk) / spec.rate)
                return None

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> RangeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def sent(self, path: str) -> int:
        with self._lock:
            return sum(r["sent"] for r in self.requests if r["path"] == path)

    def hits(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"] == path]


@pytest.fixture
def server() -> Iterator[RangeServer]:
    srv = RangeServer().start()
    yield srv
    srv.stop()


def blob(n: int, seed: int = 1) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 32
        counter += 1
    return bytes(out[:n])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAST = DownloadOptions(
    connect_timeout=2,
    read_timeout=5,
    attempts=3,
    backoff_initial=0,
    backoff_max=0,
    chunk_size=64 * 1024,
    free_space_margin=0,
    min_free=to_disk_floor("0"),  # tests that need the floor set it (and fake the disk)
    sleep=lambda s: None,
)


def engine(tmp_path: Path, **changes: Any) -> Engine:
    return Engine(tmp_path / "state", options=dataclasses.replace(FAST, **changes))


def task(srv: RangeServer, path: str, dest: Path, **kw: Any) -> DownloadTask:
    kw.setdefault("filename", path.rsplit("/", 1)[-1])
    return DownloadTask(name=kw.pop("name", path.rsplit("/", 1)[-1]), url=srv.url(path), dest_dir=dest, **kw)


# ---------------------------------------------------------------- tests
def test_a_file_is_downloaded_verified_installed_and_recorded(server: RangeServer, tmp_path: Path) -> None:
    data = blob(300_000)
    server.files["/m/a.safetensors"] = FileSpec(data)
    dest = tmp_path / "models" / "checkpoints"
    result = engine(tmp_path).download(task(server, "/m/a.safetensors", dest, sha256=sha(data), size=len(data)))
    assert result.state == "downloaded", result.error
    assert (dest / "a.safetensors").read_bytes() == data
    assert result.sha256 == sha(data)
    assert [p.name for p in dest.iterdir()] == ["a.safetensors"]  # no .part left behind
    record = read_json(tmp_path / "state" / VERIFIED_FILE)
    (entry,) = record.values()
    assert entry["sha256"] == sha(data)
    assert entry["size"] == len(data)


def test_a_verified_file_is_skipped_without_network_or_rehashing(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob(100_000)
    server.files["/a.bin"] = FileSpec(data)
    dest = tmp_path / "dest"
    t = task(server, "/a.bin", dest, sha256=sha(data))
    assert engine(tmp_path).download(t).state == "downloaded"
    before = len(server.requests)

    def no_hash(*a: Any, **k: Any) -> Any:
        raise AssertionError("hashed a verified file again")

    monkeypatch.setattr(downloads, "hash_file", no_hash)  # a resumed part's prefix
    monkeypatch.setattr(verified, "hash_file", no_hash)  # a file adopted without a record
    again = engine(tmp_path).download(t)
    assert again.state == "skipped"
    assert len(server.requests) == before


def test_a_changed_file_on_disk_is_downloaded_again(server: RangeServer, tmp_path: Path) -> None:
    data = blob(50_000)
    server.files["/a.bin"] = FileSpec(data)
    dest = tmp_path / "dest"
    t = task(server, "/a.bin", dest, sha256=sha(data))
    engine(tmp_path).download(t)
    (dest / "a.bin").write_bytes(b"corrupted")
    result = engine(tmp_path).download(t)
    assert result.state == "downloaded"
    assert (dest / "a.bin").read_bytes() == data


def test_an_interrupted_transfer_resumes_and_re_transfers_only_the_missing_part(
    server: RangeServer, tmp_path: Path
) -> None:
    data = blob(2_000_000)
    server.files["/big.bin"] = FileSpec(data, drop_after=800_000)
    dest = tmp_path / "dest"
    result = engine(tmp_path).download(task(server, "/big.bin", dest, sha256=sha(data)))
    assert result.state == "downloaded", result.error
    assert (dest / "big.bin").read_bytes() == data
    hits = server.hits("/big.bin")
    assert len(hits) == 2
    assert hits[0]["range"] is None
    assert hits[0]["sent"] == 800_000
    # The resume starts where the last whole chunk was written (a torn chunk is read again).
    resumed_at = int(hits[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 800_000 - FAST.chunk_size <= resumed_at <= 800_000
    assert hits[1]["status"] == 206
    assert server.sent("/big.bin") <= len(data) + FAST.chunk_size  # the missing part, not the file again


def test_a_part_left_by_an_earlier_run_is_resumed_with_its_prefix_hashed(server: RangeServer, tmp_path: Path) -> None:
    data = blob(1_000_000)
    server.files["/x.bin"] = FileSpec(data, drop_after=300_000, drops=1)
    dest = tmp_path / "dest"
    first = engine(tmp_path, attempts=1).download(task(server, "/x.bin", dest, sha256=sha(data)))
    assert first.state == "failed"
    assert "partial file is kept" in first.error
    assert not (dest / "x.bin").exists()
    second = engine(tmp_path).download(task(server, "/x.bin", dest, sha256=sha(data)))
    assert second.state == "downloaded", second.error
    resumed_at = len(data) - second.bytes_transferred
    assert 300_000 - FAST.chunk_size <= resumed_at <= 300_000
    assert server.hits("/x.bin")[-1]["range"] == f"bytes={resumed_at}-"
    assert (dest / "x.bin").read_bytes() == data


def test_a_server_that_ignores_range_is_restarted_from_zero(server: RangeServer, tmp_path: Path) -> None:
    data = blob(500_000)
    server.files["/r.bin"] = FileSpec(data, drop_after=200_000, ignore_range=True)
    dest = tmp_path / "dest"
    result = engine(tmp_path).download(task(server, "/r.bin", dest, sha256=sha(data)))
    assert result.state == "downloaded", result.error
    assert (dest / "r.bin").read_bytes() == data
    assert [h["status"] for h in server.hits("/r.bin")] == [200, 200]


def test_a_changed_remote_file_restarts_the_resume_through_if_range(server: RangeServer, tmp_path: Path) -> None:
    old, new = blob(400_000, seed=1), blob(400_000, seed=2)
    server.files["/c.bin"] = FileSpec(old, drop_after=100_000, etag='"old"')
    dest = tmp_path / "dest"
    engine(tmp_path, attempts=1).download(task(server, "/c.bin", dest))
    server.files["/c.bin"] = FileSpec(new, etag='"new"')
    result = engine(tmp_path).download(task(server, "/c.bin", dest))
    assert result.state == "downloaded"
    assert server.hits("/c.bin")[-1]["status"] == 200  # If-Range did not match: whole file
    assert (dest / "c.bin").read_bytes() == new


def test_a_wrong_sha256_is_not_installed_and_the_error_names_the_model(server: RangeServer, tmp_path: Path) -> None:
    server.files["/bad.bin"] = FileSpec(blob(10_000))
    dest = tmp_path / "dest"
    result = engine(tmp_path).download(task(server, "/bad.bin", dest, sha256="0" * 64, name="my-model"))
    assert result.state == "failed"
    assert result.error.startswith("my-model: sha256 mismatch")
    assert list(dest.iterdir()) == []  # neither the file nor its part


def test_a_size_mismatch_is_not_installed(server: RangeServer, tmp_path: Path) -> None:
    server.files["/s.bin"] = FileSpec(blob(1000))
    dest = tmp_path / "dest"
    result = engine(tmp_path).download(task(server, "/s.bin", dest, size=999))
    assert result.state == "failed"
    assert "size mismatch" in result.error
    assert list(dest.iterdir()) == []


def test_401_without_a_token_names_the_variable_to_set(server: RangeServer, tmp_path: Path) -> None:
    server.files["/private.bin"] = FileSpec(blob(10), token="s3cret-token")
    result = engine(tmp_path).download(task(server, "/private.bin", tmp_path / "d", token_var="HF_TOKEN"))
    assert result.state == "failed"
    assert "set HF_TOKEN" in result.error
    assert "401" in result.error
    assert len(server.hits("/private.bin")) == 1  # not retried


def test_a_refused_token_is_named_by_variable_never_by_value(server: RangeServer, tmp_path: Path) -> None:
    server.files["/private.bin"] = FileSpec(blob(10), token="right-token")
    t = task(
        server,
        "/private.bin",
        tmp_path / "d",
        token_var="CIVITAI_TOKEN",
        headers={"Authorization": "Bearer wrong-token-value"},
    )
    result = engine(tmp_path).download(t)
    assert "refused the token in CIVITAI_TOKEN" in result.error
    assert "wrong-token-value" not in result.error


def test_a_token_in_the_url_never_reaches_errors_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port_block(1)  # nothing listens: connection refused
    t = DownloadTask(
        name="m",
        url=f"http://127.0.0.1:{port}/m.bin?token=query-secret",
        dest_dir=tmp_path / "d",
        filename="m.bin",
    )
    result = engine(tmp_path).download(t)
    assert result.state == "failed"
    assert "connection failed" in result.error
    assert "query-secret" not in result.error
    assert "query-secret" not in caplog.text
    assert "query-secret" not in repr(t)


def test_a_traversal_file_name_from_the_server_is_rejected(server: RangeServer, tmp_path: Path) -> None:
    server.files["/api/download/models/7"] = FileSpec(blob(100), disposition='attachment; filename="../../evil.sh"')
    dest = tmp_path / "models" / "loras"
    t = DownloadTask(name="civitai:7", url=server.url("/api/download/models/7"), dest_dir=dest)
    result = engine(tmp_path).download(t)
    assert result.state == "failed"
    assert "unsafe" in result.error
    assert "set filename:" in result.error
    assert not (tmp_path / "evil.sh").exists()
    assert not (tmp_path / "models" / "evil.sh").exists()
    assert list(dest.iterdir()) == []


def test_the_file_name_comes_from_a_sanitised_content_disposition(server: RangeServer, tmp_path: Path) -> None:
    data = blob(1000)
    server.files["/api/download/models/9"] = FileSpec(
        data, disposition="attachment; filename=\"fallback.bin\"; filename*=UTF-8''my%20lora%20v2.safetensors"
    )
    dest = tmp_path / "loras"
    t = DownloadTask(name="civitai:9", url=server.url("/api/download/models/9"), dest_dir=dest)
    result = engine(tmp_path).download(t)
    assert result.state == "downloaded"
    assert (dest / "my lora v2.safetensors").read_bytes() == data
    # The name is remembered: the next run skips without asking the server.
    before = len(server.requests)
    assert engine(tmp_path).download(t).state == "skipped"
    assert len(server.requests) == before


def test_no_free_space_fails_before_writing_with_a_clear_error(server: RangeServer, tmp_path: Path) -> None:
    server.files["/huge.bin"] = FileSpec(blob(100_000))
    dest = tmp_path / "dest"
    e = engine(tmp_path, disk_free=lambda p: 50_000, free_space_margin=1000)
    result = e.download(task(server, "/huge.bin", dest))
    assert result.state == "failed"
    assert "not enough disk space" in result.error
    assert "dest" in result.error
    assert list(dest.iterdir()) == []
    assert len(server.hits("/huge.bin")) == 1  # not retried


def test_concurrent_downloads_reserve_space_for_each_other(server: RangeServer, tmp_path: Path) -> None:
    for i in range(2):
        server.files[f"/f{i}.bin"] = FileSpec(blob(200_000, seed=i), rate=2_000_000)
    e = engine(tmp_path, disk_free=lambda p: 300_000)
    results = e.run([task(server, f"/f{i}.bin", tmp_path / "d") for i in range(2)], concurrency=2)
    states = sorted(r.state for r in results)
    assert states == ["downloaded", "failed"]
    assert "for other downloads" in next(r.error for r in results if r.state == "failed")


def test_transient_errors_are_retried_with_backoff(server: RangeServer, tmp_path: Path) -> None:
    data = blob(1000)
    server.files["/busy.bin"] = FileSpec(data, fail_first=2)
    waits: list[float] = []
    e = engine(tmp_path, sleep=waits.append, backoff_initial=1.0, backoff_max=60.0, attempts=5)
    result = e.download(task(server, "/busy.bin", tmp_path / "d"))
    assert result.state == "downloaded"
    assert waits == [1.0, 2.0]


def test_a_missing_file_is_not_retried(server: RangeServer, tmp_path: Path) -> None:
    result = engine(tmp_path).download(task(server, "/nothing.bin", tmp_path / "d", name="ghost"))
    assert result.state == "failed"
    assert result.error.startswith("ghost: not found (HTTP 404)")
    assert len(server.hits("/nothing.bin")) == 1


def test_files_download_in_parallel(server: RangeServer, tmp_path: Path) -> None:
    for i in range(4):
        server.files[f"/p{i}.bin"] = FileSpec(blob(100_000, seed=i), rate=1_000_000)
    results = engine(tmp_path).run([task(server, f"/p{i}.bin", tmp_path / "d") for i in range(4)], concurrency=4)
    assert all(r.state == "downloaded" for r in results)
    assert server.max_active >= 3


def test_an_existing_file_with_the_right_hash_is_adopted_without_network(server: RangeServer, tmp_path: Path) -> None:
    data = blob(5000)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "a.bin").write_bytes(data)
    result = engine(tmp_path).download(task(server, "/a.bin", dest, sha256=sha(data)))
    assert result.state == "verified"
    assert server.requests == []


def test_content_disposition_and_content_range_parsing() -> None:
    f = responses.filename_from_disposition
    assert f('attachment; filename="a b.safetensors"') == "a b.safetensors"
    assert f("attachment; filename*=UTF-8''%E2%9C%93.bin") == "\u2713.bin"
    assert f("attachment; filename=plain.ckpt") == "plain.ckpt"
    assert f("inline") is None
    assert f(None) is None
    assert responses.parse_content_range("bytes 100-199/1000") == (100, 1000)
    assert responses.parse_content_range("bytes */1000") == (None, 1000)
    assert responses.parse_content_range(None) == (None, None)


def test_the_part_file_is_never_visible_under_the_final_name(server: RangeServer, tmp_path: Path) -> None:
    data = blob(600_000)
    server.files["/slow.bin"] = FileSpec(data, rate=3_000_000)
    dest = tmp_path / "d"
    seen: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            final = dest / "slow.bin"
            if final.exists():
                seen.append(final.stat().st_size == len(data))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert engine(tmp_path).download(task(server, "/slow.bin", dest)).state == "downloaded"
    finally:
        done.set()
        watcher.join()
    assert all(seen)
    assert os.listdir(dest) == ["slow.bin"]


def test_a_torn_file_under_its_recorded_name_is_downloaded_again_even_without_a_hash(
    server: RangeServer, tmp_path: Path
) -> None:
    data = blob(70_000)
    server.files["/t.bin"] = FileSpec(data)
    dest = tmp_path / "d"
    t = task(server, "/t.bin", dest)  # no sha256, no size in the manifest
    assert engine(tmp_path).download(t).state == "downloaded"
    with (dest / "t.bin").open("r+b") as fh:  # what a power loss can leave: a shorter file
        fh.truncate(10_000)
    result = engine(tmp_path).download(t)
    assert result.state == "downloaded"
    assert (dest / "t.bin").read_bytes() == data


def test_an_encoded_body_is_read_through_requests_decoding(tmp_path: Path) -> None:
    import gzip

    data = blob(50_000)
    body = gzip.compress(data)

    class Gzip(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return None

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gzip)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/g.bin"
        t = DownloadTask(name="g", url=url, dest_dir=tmp_path / "d", filename="g.bin", sha256=sha(data))
        result = engine(tmp_path).download(t)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.state == "downloaded", result.error
    assert (tmp_path / "d" / "g.bin").read_bytes() == data


def test_urllib3_debug_logs_lose_their_query_strings_in_the_cli_logs(server: RangeServer, tmp_path: Path) -> None:
    # The engine changes no logger: the CLI's log handlers strip urllib3's query strings.
    log_file = tmp_path / "cli.log"
    server.files["/q.bin"] = FileSpec(blob(100))
    t = DownloadTask(
        name="q", url=server.url("/q.bin") + "?token=debug-secret", dest_dir=tmp_path / "d", filename="q.bin"
    )
    with setup_logging(fmt="text", level="debug", secrets=(), log_file=log_file, stream=False):
        logging.getLogger("urllib3").setLevel(logging.DEBUG)  # put back when the set-up is undone
        assert engine(tmp_path).download(t).state == "downloaded"
    text = log_file.read_text()
    assert "/q.bin" in text
    assert "debug-secret" not in text


def test_the_engine_leaves_urllib3s_loggers_alone(tmp_path: Path) -> None:
    before = {name: list(logging.getLogger(name).filters) for name in ("urllib3", "urllib3.connectionpool")}
    engine(tmp_path)
    assert {name: list(logging.getLogger(name).filters) for name in before} == before


# ---------------------------------------------------------------- hostile servers and a full disk
class Hostile:
    """A server whose every GET runs ``answer(handler)``; counts its requests."""

    def __init__(self, answer: Any) -> None:
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                owner.requests.append(self.path)
                try:
                    answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile() -> Iterator[Any]:
    servers: list[Hostile] = []

    def start(answer: Any) -> Hostile:
        servers.append(Hostile(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def endless(handler: http.server.BaseHTTPRequestHandler, content_length: int | None = None) -> None:
    """200 with a body that never ends (no Content-Length: it ends when the connection closes)."""
    handler.send_response(200)
    if content_length is not None:
        handler.send_header("Content-Length", str(content_length))
    handler.end_headers()
    piece = blob(64 * 1024)
    for _ in range(16 * 1024):  # 1 GiB: a safety stop for a broken engine, never reached
        handler.wfile.write(piece)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_an_endless_body_without_a_length_stops_at_models_max_bytes(hostile: Any, tmp_path: Path) -> None:
    srv = hostile(endless)
    dest = tmp_path / "d"
    t = DownloadTask(name="endless", url=srv.url("/e.bin?token=cap-secret"), dest_dir=dest, filename="e.bin")
    result = engine(tmp_path, max_bytes=1 << 20).download(t)
    assert result.state == "failed"
    assert "over the cap of 1.0 MiB (MODELS_MAX_BYTES=1048576)" in result.error
    assert "/e.bin" in result.error
    assert "cap-secret" not in result.error
    assert "\n" not in result.error
    assert leftovers(dest) == []  # neither the final name nor a .part
    assert len(srv.requests) == 1  # not retried


def test_a_content_length_over_the_cap_fails_before_a_byte_is_written(hostile: Any, tmp_path: Path) -> None:
    srv = hostile(lambda h: endless(h, content_length=50 << 20))
    dest = tmp_path / "d"
    t = DownloadTask(name="big", url=srv.url("/big.bin"), dest_dir=dest, filename="big.bin")
    result = engine(tmp_path, max_bytes=1 << 20).download(t)
    assert result.state == "failed"
    assert "announces 52428800 bytes, over the cap" in result.error
    assert leftovers(dest) == []
    assert len(srv.requests) == 1


def test_the_manifest_size_is_the_cap_of_an_endless_body(hostile: Any, tmp_path: Path) -> None:
    srv = hostile(endless)
    dest = tmp_path / "d"
    t = DownloadTask(name="sized", url=srv.url("/s.bin"), dest_dir=dest, filename="s.bin", size=200_000)
    result = engine(tmp_path).download(t)  # MODELS_MAX_BYTES is 200 GiB: the size is what stops it
    assert result.state == "failed"
    assert "size mismatch" in result.error
    assert "the manifest says 200000 bytes" in result.error
    assert leftovers(dest) == []


def test_a_download_stops_at_the_free_space_floor_and_removes_its_part(hostile: Any, tmp_path: Path) -> None:
    srv = hostile(endless)
    dest = tmp_path / "d"
    disk = 10 << 20
    seen: list[int] = []

    def disk_free(path: Path) -> int:  # a 10 MiB disk that only this download fills
        part = next((p for p in path.iterdir() if p.name.endswith(".part")), None) if path.exists() else None
        used = part.stat().st_size if part else 0
        seen.append(used)
        return disk - used

    e = engine(tmp_path, disk_free=disk_free, disk_size=lambda p: disk, min_free=to_disk_floor("8M"))
    result = e.download(DownloadTask(name="filler", url=srv.url("/f.bin"), dest_dir=dest, filename="f.bin"))
    assert result.state == "failed"
    assert result.error.startswith("filler: stopped: ")
    assert "free in" in result.error
    assert "the floor is 8.0 MiB (MIN_FREE_DISK=8M)" in result.error
    assert "the partial file was removed" in result.error
    assert "\n" not in result.error
    assert max(seen) == disk - (8 << 20)  # filled up to the floor, never past it
    assert leftovers(dest) == []
    assert len(srv.requests) == 1


def test_a_download_is_not_started_below_the_floor(server: RangeServer, tmp_path: Path) -> None:
    server.files["/x.bin"] = FileSpec(blob(1000))
    e = engine(tmp_path, disk_free=lambda p: 100 << 20, disk_size=lambda p: 10 << 30, min_free=to_disk_floor("5G,5%"))
    result = e.download(task(server, "/x.bin", tmp_path / "d"))
    assert result.state == "failed"
    assert "needs 1000 B (+ 512.0 MiB kept free, MIN_FREE_DISK=5G,5%)" in result.error  # 5 % of 10 GiB
    assert leftovers(tmp_path / "d") == []


def test_disk_full_while_writing_is_one_clear_line_and_no_part(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/full.bin"] = FileSpec(blob(500_000))
    real = partfile.write_all
    calls: list[int] = []

    def write_all(fh: Any, view: memoryview) -> None:
        calls.append(len(view))
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fh, view)

    monkeypatch.setattr(partfile, "write_all", write_all)
    dest = tmp_path / "d"
    result = engine(tmp_path).download(task(server, "/full.bin", dest, name="full"))
    assert result.state == "failed"
    assert result.error.startswith("full: the disk is full in ")
    assert "MIN_FREE_DISK" in result.error
    assert "\n" not in result.error
    assert "Errno" not in result.error
    assert leftovers(dest) == []
    assert len(server.hits("/full.bin")) == 1  # not retried


def test_a_full_disk_for_the_sidecar_file_fails_that_file_with_one_line(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/side.bin"] = FileSpec(blob(1000))

    def no_space(*a: Any, **k: Any) -> bool:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(partfile, "write_json", no_space)
    result = engine(tmp_path).download(task(server, "/side.bin", tmp_path / "d", name="side"))
    assert result.state == "failed"
    assert result.error.startswith("side: the disk is full in ")
    assert leftovers(tmp_path / "d") == []


def test_the_status_file_on_a_full_disk_does_not_fail_the_download(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server.files["/ok.bin"] = FileSpec(blob(300_000))

    def no_space(*a: Any, **k: Any) -> bool:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(status, "write_json", no_space)
    writer = status.StatusWriter(tmp_path / "status.json", tier="all", interval=0)
    t = task(server, "/ok.bin", tmp_path / "d")
    writer.begin([t])
    result = Engine(tmp_path / "state", options=FAST, progress=writer).download(t)
    writer.close()
    assert result.state == "downloaded", result.error
    warnings = [r for r in caplog.records if "models status file" in r.getMessage()]
    assert len(warnings) == 1  # said once, not on every chunk


def test_half_a_file_then_close_with_range_ignored_fails_after_bounded_attempts(
    server: RangeServer, tmp_path: Path
) -> None:
    data = blob(400_000)
    server.files["/half.bin"] = FileSpec(data, drop_after=200_000, drops=10**9, ignore_range=True)
    dest = tmp_path / "d"
    result = engine(tmp_path, attempts=3, retries=50).download(task(server, "/half.bin", dest, name="half"))
    assert result.state == "failed"
    assert "after 3 attempts without progress" in result.error
    hits = server.hits("/half.bin")
    assert len(hits) == 3  # the first got bytes; the two restarts from 0 that die there did not progress
    assert all(h["status"] == 200 for h in hits)
    assert not (dest / "half.bin").exists()


def test_retries_are_bounded_in_count_even_when_every_attempt_progresses(server: RangeServer, tmp_path: Path) -> None:
    data = blob(2_000_000)
    server.files["/drip.bin"] = FileSpec(data, drop_after=100_000, drops=10**9)
    dest = tmp_path / "d"
    result = engine(tmp_path, attempts=3, retries=4).download(task(server, "/drip.bin", dest, name="drip"))
    assert result.state == "failed"
    assert "after 5 attempts (DOWNLOAD_RETRIES=4)" in result.error
    assert [h["status"] for h in server.hits("/drip.bin")] == [200, 206, 206, 206, 206]
    assert not (dest / "drip.bin").exists()


def test_retries_are_bounded_in_time(server: RangeServer, tmp_path: Path) -> None:
    server.files["/slowfail.bin"] = FileSpec(blob(1000), fail_first=10**9)
    now = [0.0]

    def clock() -> float:
        now[0] += 100.0
        return now[0]

    e = engine(tmp_path, attempts=100, retries=100, retry_seconds=450, clock=clock)
    result = e.download(task(server, "/slowfail.bin", tmp_path / "d", name="slow"))
    assert result.state == "failed"
    assert "DOWNLOAD_RETRY_SECONDS=450" in result.error
    assert len(server.hits("/slowfail.bin")) < 10


def test_a_redirect_loop_fails_at_once(server: RangeServer, tmp_path: Path) -> None:
    server.files["/loop"] = FileSpec(redirect="/loop?token=loop-secret")
    t = DownloadTask(name="loopy", url=server.url("/loop"), dest_dir=tmp_path / "d", filename="l.bin")
    result = engine(tmp_path).download(t)
    assert result.state == "failed"
    assert result.error.startswith("loopy: ")
    assert "a redirect loop" in result.error
    assert "not retried" in result.error
    assert "loop-secret" not in result.error
    assert len(server.hits("/loop")) == 31  # one chain of requests' 30 redirects, not one per attempt
    assert leftovers(tmp_path / "d") == []


def test_too_many_redirects_fail_at_once(server: RangeServer, tmp_path: Path) -> None:
    for i in range(40):
        server.files[f"/r{i}"] = FileSpec(redirect=f"/r{i + 1}")
    t = DownloadTask(name="chain", url=server.url("/r0"), dest_dir=tmp_path / "d", filename="c.bin")
    result = engine(tmp_path).download(t)
    assert result.state == "failed"
    assert "more than 30 redirects" in result.error
    assert "not retried" in result.error
    assert len(server.requests) == 31


def test_sizes_and_the_floor_parse_and_apply() -> None:
    assert parse_size("500M") == 500 << 20
    assert parse_size("5G") == parse_size("5GiB") == 5 << 30
    assert parse_size("1024") == 1024
    floor = to_disk_floor("5G,5%")
    assert floor.bytes_for(1 << 40) == 5 << 30  # 5 % of 1 TiB is more: 5 GiB
    assert floor.bytes_for(30 << 20) == int((30 << 20) * 0.05)  # 5 % of a small disk
    assert to_disk_floor("0").bytes_for(1 << 40) == 0
    assert str(floor) == "5G,5%"
    for bad in ("lots", "5X", "150%"):
        with pytest.raises(ValueError, match="expected"):
            to_disk_floor(bad)


def test_the_download_settings_reach_the_engine(tmp_path: Path) -> None:
    settings = load_settings({
        "ROOT": str(tmp_path), "MODELS_MAX_BYTES": "2G", "MIN_FREE_DISK": "10%",
        "DOWNLOAD_RETRIES": "3", "DOWNLOAD_RETRY_SECONDS": "5m",
    })
    opts = download_options(settings)
    assert (opts.max_bytes, opts.retries, opts.retry_seconds) == (2 << 30, 3, 300.0)
    assert opts.min_free.bytes_for(1000) == 100
    with pytest.raises(ConfigError, match="MIN_FREE_DISK"):
        load_settings({"ROOT": str(tmp_path), "MIN_FREE_DISK": "plenty"})


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 30 MiB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)], capture_output=True, check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_endless_download_on_a_30_mib_tmpfs_stops_at_the_default_floor(hostile: Any, tmpfs: Path) -> None:
    srv = hostile(endless)
    dest = tmpfs / "models"
    e = Engine(tmpfs / "state", options=dataclasses.replace(FAST, min_free=to_disk_floor("5G,5%")))
    result = e.download(DownloadTask(name="filler", url=srv.url("/f.bin"), dest_dir=dest, filename="f.bin"))
    assert result.state == "failed"
    assert "MIN_FREE_DISK=5G,5%" in result.error
    assert "\n" not in result.error
    assert leftovers(dest) == []
    st = os.statvfs(tmpfs)
    assert st.f_bavail * st.f_frsize >= int(st.f_blocks * st.f_frsize * 0.05)


def test_an_endless_download_on_a_full_tmpfs_without_a_floor_is_one_clear_line(hostile: Any, tmpfs: Path) -> None:
    srv = hostile(endless)
    dest = tmpfs / "models"
    e = Engine(tmpfs / "state", options=FAST)  # MIN_FREE_DISK=0: the disk really fills (ENOSPC)
    result = e.download(DownloadTask(name="filler", url=srv.url("/f.bin"), dest_dir=dest, filename="f.bin"))
    assert result.state == "failed"
    assert result.error.startswith("filler: the disk is full in ")
    assert "\n" not in result.error
    assert leftovers(dest) == []
