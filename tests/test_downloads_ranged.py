"""Large files over several ranged connections: against the real local server of test_downloads."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import wait_for
from test_downloads import FAST, FileSpec, Hostile, RangeServer, blob, leftovers, sha

from orchestrator.core.disk import to_disk_floor
from orchestrator.core.settings import load_settings
from orchestrator.machine.fs import read_json
from orchestrator.provision.models import partfile, ranged, ranges
from orchestrator.provision.models.downloads import Engine
from orchestrator.provision.models.sync import download_options
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask

CHUNK = 128 * 1024
SIZE = 2 * 1024 * 1024  # 16 chunks
RANGED = dataclasses.replace(FAST, connections=4, ranged_min_bytes=1 << 20)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranged, "CHUNK_MIN", CHUNK)  # (8 MiB in production)
    monkeypatch.setattr(ranged, "RAMP_WINDOW", 0)  # every connection at once (the ramp has its own test)


@pytest.fixture
def server() -> Iterator[RangeServer]:
    srv = RangeServer().start()
    yield srv
    srv.stop()


def engine(tmp_path: Path, **changes: Any) -> Engine:
    return Engine(tmp_path / "state", options=dataclasses.replace(RANGED, **changes))


def task(srv: RangeServer, path: str, dest: Path, **kw: Any) -> DownloadTask:
    return DownloadTask(name=path.strip("/"), url=srv.url(path), dest_dir=dest, filename=path.strip("/"), **kw)


def ranges_asked(srv: RangeServer, path: str) -> list[tuple[int, int]]:
    """The closed ranges (first, last + 1) requested for ``path``."""
    out = []
    for hit in srv.hits(path):
        if hit["range"] and not hit["range"].endswith("-"):
            a, b = hit["range"].removeprefix("bytes=").split("-")
            out.append((int(a), int(b) + 1))
    return out


@pytest.mark.parametrize("in_order", [True, False], ids=["hash-in-order", "hash-after"])
def test_a_large_file_comes_over_several_ranged_connections_and_is_verified(
    server: RangeServer, tmp_path: Path, in_order: bool
) -> None:
    data = blob(SIZE)
    server.files["/big.bin"] = FileSpec(data, rate=2_000_000)  # per connection
    dest = tmp_path / "d"
    result = engine(tmp_path, hash_in_order=in_order).download(task(server, "/big.bin", dest, sha256=sha(data)))
    assert result.state == "downloaded", result.error
    assert (dest / "big.bin").read_bytes() == data
    assert result.sha256 == sha(data)
    assert leftovers(dest) == ["big.bin"]  # neither the part nor its sidecar
    hits = server.hits("/big.bin")
    assert hits[0]["range"] is None
    assert hits[0]["status"] == 200
    asked = ranges_asked(server, "/big.bin")
    assert len(asked) == SIZE // CHUNK - 1
    assert sorted(asked) == [(a, a + CHUNK) for a in range(CHUNK, SIZE, CHUNK)]  # each byte asked once
    assert all(h["status"] == 206 for h in hits[1:])
    assert server.max_active >= 3  # connections at once
    assert len({h["client"] for h in hits}) <= RANGED.connections + 1  # kept alive (else one per chunk)
    # The first answer is cut after its chunk: at most what sat in the socket buffers besides.
    assert server.sent("/big.bin") < SIZE + 4 * 1024 * 1024


def test_connections_ramp_up_to_the_limit_against_a_server_that_caps_each_one(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranged, "RAMP_WINDOW", 0.2)
    data = blob(4 * SIZE)
    server.files["/cdn.bin"] = FileSpec(data, rate=4_000_000)  # per connection
    result = engine(tmp_path).download(task(server, "/cdn.bin", tmp_path / "d", sha256=sha(data)))
    assert result.state == "downloaded", result.error
    assert server.max_active == RANGED.connections  # 1 → 2 → 4: each doubling doubled the rate


def test_the_ramp_stops_when_more_connections_bring_no_more_bytes() -> None:
    assert ranged.doubled(10e6, 19e6)  # capped per connection: twice the connections, about twice the rate
    assert not ranged.doubled(800e6, 820e6)  # not capped (or the link or the CPUs are the limit)
    assert not ranged.doubled(800e6, 1100e6)


def test_a_file_under_the_threshold_or_one_connection_stays_one_stream(server: RangeServer, tmp_path: Path) -> None:
    data = blob(SIZE)
    server.files["/a.bin"] = FileSpec(data)
    server.files["/b.bin"] = FileSpec(data)
    assert engine(tmp_path, ranged_min_bytes=SIZE + 1).download(task(server, "/a.bin", tmp_path / "d")).ok
    assert engine(tmp_path, connections=1).download(task(server, "/b.bin", tmp_path / "d")).ok
    assert [h["range"] for h in server.requests] == [None, None]


def test_a_server_without_ranges_is_read_in_one_stream(server: RangeServer, tmp_path: Path) -> None:
    data = blob(SIZE)
    server.files["/n.bin"] = FileSpec(data, accept_ranges=False)
    result = engine(tmp_path).download(task(server, "/n.bin", tmp_path / "d", sha256=sha(data)))
    assert result.state == "downloaded", result.error
    assert (tmp_path / "d" / "n.bin").read_bytes() == data
    assert [(h["range"], h["status"]) for h in server.hits("/n.bin")] == [(None, 200)]


def test_a_server_that_claims_ranges_but_answers_200_falls_back_to_one_stream(
    server: RangeServer, tmp_path: Path
) -> None:
    data = blob(SIZE)
    server.files["/liar.bin"] = FileSpec(data, ignore_range=True)  # Accept-Ranges: bytes, yet 200 to a Range
    dest = tmp_path / "d"
    result = engine(tmp_path).download(task(server, "/liar.bin", dest, sha256=sha(data)))
    assert result.state == "downloaded", result.error
    assert (dest / "liar.bin").read_bytes() == data
    assert leftovers(dest) == ["liar.bin"]
    hits = server.hits("/liar.bin")
    assert all(h["status"] == 200 for h in hits)
    # The first GET, up to one refused range per connection, then one stream that ends the file.
    assert len(hits) <= 1 + RANGED.connections + 2
    assert hits[-1]["sent"] == SIZE


def test_ranges_that_fail_midway_are_fetched_again_by_the_other_connections(
    server: RangeServer, tmp_path: Path
) -> None:
    data = blob(SIZE)
    # The first GET and the first two range requests close after 50 kB.
    server.files["/flaky.bin"] = FileSpec(data, drop_after=50_000, drops=3, rate=8_000_000)
    dest = tmp_path / "d"
    result = engine(tmp_path).download(task(server, "/flaky.bin", dest, sha256=sha(data)))
    assert result.state == "downloaded", result.error
    assert (dest / "flaky.bin").read_bytes() == data
    hits = server.hits("/flaky.bin")
    assert [h["sent"] for h in hits[:3]] == [50_000] * 3
    # Chunks 1–15 once each, and the rest of the three dropped chunks once more (by the others).
    assert len(ranges_asked(server, "/flaky.bin")) == SIZE // CHUNK - 1 + 3
    assert server.sent("/flaky.bin") <= SIZE + 3 * 50_000  # (bytes that came before a reset may be lost)


def test_when_every_connection_fails_the_attempt_is_retried_from_the_written_ranges(
    server: RangeServer, tmp_path: Path
) -> None:
    data = blob(SIZE)
    server.files["/down.bin"] = FileSpec(data, drop_after=50_000, drops=10**9)  # every request is cut
    flipped: list[int] = []

    def backoff(seconds: float) -> None:  # between attempts: the server recovers
        flipped.append(len(server.hits("/down.bin")))
        server.files["/down.bin"] = FileSpec(data)

    dest = tmp_path / "d"
    result = engine(tmp_path, sleep=backoff).download(task(server, "/down.bin", dest, sha256=sha(data)))
    assert result.state == "downloaded", result.error
    assert (dest / "down.bin").read_bytes() == data
    assert len(flipped) == 1  # one failed attempt: when its last connection failed
    hits = server.hits("/down.bin")
    first, second = hits[: flipped[0]], hits[flipped[0] :]
    assert len(first) >= RANGED.connections
    assert all(h["sent"] <= 50_000 for h in first)
    # The next attempt resumed from the recorded ranges (no new first GET from byte 0) and asked
    # only for what was missing (bytes that came just before a reset may be lost and asked again).
    assert all(h["range"] and not h["range"].endswith("-") for h in second)
    assert server.sent("/down.bin") <= SIZE + len(first) * 50_000


def test_a_wrong_sha256_after_a_ranged_download_is_not_installed_and_the_part_is_removed(
    server: RangeServer, tmp_path: Path
) -> None:
    server.files["/bad.bin"] = FileSpec(blob(SIZE))
    dest = tmp_path / "d"
    result = engine(tmp_path).download(task(server, "/bad.bin", dest, sha256="0" * 64))
    assert result.state == "failed"
    assert result.error.startswith("bad.bin: sha256 mismatch")
    assert leftovers(dest) == []
    assert len(server.hits("/bad.bin")) > 2  # it did go ranged


def test_a_manifest_size_below_the_length_fails_before_any_range_is_asked(server: RangeServer, tmp_path: Path) -> None:
    server.files["/capped.bin"] = FileSpec(blob(SIZE))
    dest = tmp_path / "d"
    result = engine(tmp_path).download(task(server, "/capped.bin", dest, size=SIZE - 1))
    assert result.state == "failed"
    assert "announces 2097152 bytes, the manifest says 2097151" in result.error
    assert len(server.hits("/capped.bin")) == 1
    assert leftovers(dest) == []


def test_the_floor_stops_every_connection_and_removes_the_part(server: RangeServer, tmp_path: Path) -> None:
    server.files["/fill.bin"] = FileSpec(blob(SIZE), rate=8_000_000)
    dest = tmp_path / "d"
    floor = 8 << 20
    disk = floor + SIZE + CHUNK

    def disk_free(path: Path) -> int:  # a disk that another writer fills once a quarter of the part is written
        parts = list(path.glob(".*.part")) if path.exists() else []
        written = sum(p.stat().st_blocks * 512 for p in parts)
        return disk - written - (SIZE if written >= SIZE // 4 else 0)

    e = engine(tmp_path, disk_free=disk_free, disk_size=lambda p: disk, min_free=to_disk_floor(str(floor)))
    result = e.download(task(server, "/fill.bin", dest))
    assert result.state == "failed"
    assert result.error.startswith("fill.bin: stopped: ")
    assert "the partial file was removed" in result.error
    assert leftovers(dest) == []
    assert len(server.hits("/fill.bin")) < SIZE // CHUNK  # stopped, not retried


def test_a_changed_remote_file_throws_the_ranged_part_away(server: RangeServer, tmp_path: Path) -> None:
    old, new = blob(SIZE, seed=1), blob(SIZE, seed=2)
    server.files["/c.bin"] = FileSpec(old, etag='"old"', drop_after=50_000, drops=10**9)
    dest = tmp_path / "d"
    first = engine(tmp_path, attempts=1).download(task(server, "/c.bin", dest))
    assert first.state == "failed"
    assert "partial file is kept" in first.error
    assert read_json(next(dest.glob(".*.part.json")))["done"]  # the written ranges are recorded
    server.files["/c.bin"] = FileSpec(new, etag='"new"')
    before = len(server.requests)
    result = engine(tmp_path).download(task(server, "/c.bin", dest))
    assert result.state == "downloaded", result.error
    assert (dest / "c.bin").read_bytes() == new
    after = server.requests[before:]
    assert after[0]["range"]
    assert not after[0]["range"].endswith("-")
    assert after[0]["status"] == 200  # that did not match: the whole new file...
    assert any(h["range"] is None for h in after[1:])  # ...so the part was thrown away and started again


KILLED_RUN = """
import dataclasses, sys
from pathlib import Path
from orchestrator.core.disk import to_disk_floor
from orchestrator.provision.models import partfile, ranged, ranges
from orchestrator.provision.models.downloads import Engine
from orchestrator.provision.models.tasks import DownloadOptions, DownloadTask
ranged.CHUNK_MIN = {chunk}
opts = DownloadOptions(connections=4, ranged_min_bytes=1 << 20, free_space_margin=0, min_free=to_disk_floor("0"))
Engine(Path({state!r}), options=opts).download(
    DownloadTask(name="k", url={url!r}, dest_dir=Path({dest!r}), filename="k.bin"))
"""


def test_a_killed_ranged_download_resumes_with_only_the_missing_ranges(server: RangeServer, tmp_path: Path) -> None:
    size = 8 * SIZE  # the record is saved every 2 MiB
    data = blob(size)
    server.files["/k.bin"] = FileSpec(data, rate=2_000_000)  # per connection: about 2 s for the file
    dest = tmp_path / "d"
    code = KILLED_RUN.format(chunk=CHUNK, state=str(tmp_path / "state"),
                             url=server.url("/k.bin"), dest=str(dest))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], start_new_session=True)

    def recorded() -> int:
        meta = read_json(next(iter(dest.glob(".*.part.json")), dest / "none"), {})
        return sum(b - a for a, b in meta.get("done", []))

    try:
        wait_for(lambda: recorded() >= size // 3 or proc.poll() is not None, 60, 0.01, what="a third recorded")
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the download ended before it was killed"
    done = [tuple(span) for span in read_json(next(dest.glob(".*.part.json")))["done"]]
    missing = size - sum(b - a for a, b in done)
    before = len(server.requests)
    result = engine(tmp_path).download(task(server, "/k.bin", dest))
    assert result.state == "downloaded", result.error
    assert (dest / "k.bin").read_bytes() == data
    resumed = server.requests[before:]
    assert all(h["range"] and not h["range"].endswith("-") for h in resumed)  # no probe: ranges only
    for hit in resumed:
        a, b = (int(v) for v in hit["range"].removeprefix("bytes=").split("-"))
        assert not any(x <= a < y for x, y in done)  # nothing recorded is asked again
    assert result.bytes_transferred == sum(h["sent"] for h in resumed) == missing


def test_the_connection_settings_reach_the_engine(tmp_path: Path) -> None:
    opts = download_options(load_settings({
        "ROOT": str(tmp_path), "MODELS_CONNECTIONS": "3", "MODELS_RANGED_MIN_BYTES": "100M",
    }))
    assert (opts.connections, opts.ranged_min_bytes) == (3, 100 << 20)
    defaults = DownloadOptions()
    assert (download_options(load_settings({"ROOT": str(tmp_path)})).connections, defaults.connections) == (8, 8)


def test_chunks_and_ranges() -> None:
    assert ranges.merge([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]
    r = ranges.Ranges(100, [(10, 30), (50, 60)], 15)
    assert list(r.todo) == [(0, 10), (30, 45), (45, 50), (60, 75), (75, 90), (90, 100)]
    assert r.written == 30
    assert ranged.chunk_size(2 << 30, 8) == 64 << 20
    assert ranged.chunk_size(1 << 20, 8) == CHUNK  # (CHUNK_MIN here)


def test_a_full_disk_on_a_ranged_write_is_one_clear_line_and_no_part(
    server: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/full.bin"] = FileSpec(blob(SIZE))
    real = partfile.pwrite_all
    calls: list[int] = []

    def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, view, offset)

    monkeypatch.setattr(partfile, "pwrite_all", pwrite_all)
    dest = tmp_path / "d"
    result = engine(tmp_path).download(task(server, "/full.bin", dest))
    assert result.state == "failed"
    assert result.error.startswith("full.bin: the disk is full in ")
    assert "\n" not in result.error
    assert leftovers(dest) == []
    assert len(server.hits("/full.bin")) <= 1 + RANGED.connections  # not retried


def test_a_range_refused_with_403_stops_the_download_without_retries(tmp_path: Path) -> None:
    data = blob(SIZE)

    def answer(h: Any) -> None:
        if h.headers.get("Range"):
            h.send_response(403)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        h.wfile.write(data)

    srv = Hostile(answer)
    try:
        t = DownloadTask(name="private", url=srv.url("/p.bin"), dest_dir=tmp_path / "d", filename="p.bin")
        result = engine(tmp_path).download(t)
    finally:
        srv.close()
    assert result.state == "failed"
    assert result.error.startswith("private: 127.0.0.1 refused access (HTTP 403)")
    assert len(srv.requests) <= 1 + RANGED.connections  # not retried
    assert not (tmp_path / "d" / "p.bin").exists()
