"""The download engine against a real local HTTP server with Range support and fault modes."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli.logconfig import setup_logging
from orchestrator.machine.fs import read_json
from orchestrator.machine.ports import free_port_block
from orchestrator.provision.models import downloads, responses, verified
from orchestrator.provision.models.downloads import Engine
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
                start, status = 0, 200
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
                body = data[start:]
                headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
                if spec.etag:
                    headers["ETag"] = spec.etag
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
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
