"""/metrics under concurrent scrapers: one rendering shared per METRICS_CACHE window."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from support import ServedApp, wait_for

from orchestrator.core.readiness import GpuStatus, InstanceStatus, Liveness, Readiness, readiness
from orchestrator.core.settings import load_settings
from orchestrator.monitor.api import create_app
from orchestrator.monitor.metrics import ExpositionCache


class CountingCollector:
    """A gauge whose value the test sets; counts how often the registry collected it (= renders)."""

    def __init__(self) -> None:
        self.value = 1.0
        self.collects = 0

    def collect(self) -> Iterator[Metric]:
        self.collects += 1
        g = GaugeMetricFamily("bench_value", "A value the test changes")
        g.add_metric([], self.value)
        yield g


class NoInstances:
    """A control plane with nothing to run (only /metrics is asked here)."""

    def liveness(self) -> Liveness:
        return Liveness(True, True, 0.1, "ok")

    def readiness(self) -> Readiness:
        return readiness([], None)

    def instance_statuses(self) -> list[InstanceStatus]:
        return []

    def instance_status(self, gpu: int) -> InstanceStatus:
        raise KeyError(f"no instance on GPU {gpu}")

    def gpu_statuses(self) -> list[GpuStatus]:
        return []

    def request_restart(self, gpu: int, reason: str) -> InstanceStatus:
        raise KeyError(f"no instance on GPU {gpu}")


def app_with(tmp_path: Path, cache: str) -> tuple[object, CountingCollector]:
    settings = load_settings({"ROOT": str(tmp_path), "METRICS_CACHE": cache})
    registry = CollectorRegistry(auto_describe=False)
    counting = CountingCollector()
    registry.register(counting)  # type: ignore[arg-type]
    return create_app(NoInstances(), settings, registry), counting


async def _scrape_all(url: str, n: int) -> list[tuple[int, bytes]]:
    async def one(session: aiohttp.ClientSession) -> tuple[int, bytes]:
        async with session.get(f"{url}/metrics") as r:
            return r.status, await r.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:
        return await asyncio.gather(*(one(session) for _ in range(n)))


def scrape_all(app: object, n: int) -> list[tuple[int, bytes]]:
    """``n`` concurrent GET /metrics against the app served for real (uvicorn, one event loop)."""
    with ServedApp(app) as served:
        return asyncio.run(_scrape_all(served.url, n))


def test_concurrent_scrapes_share_one_rendering(tmp_path: Path) -> None:
    app, counting = app_with(tmp_path, "1h")
    answers = scrape_all(app, 50)
    assert [status for status, _ in answers] == [200] * 50
    assert len({body for _, body in answers}) == 1
    assert b"bench_value 1.0" in answers[0][1]
    assert counting.collects == 1


def test_metrics_cache_0_renders_every_scrape(tmp_path: Path) -> None:
    app, counting = app_with(tmp_path, "0")
    assert [status for status, _ in scrape_all(app, 20)] == [200] * 20
    assert counting.collects == 20


def test_a_change_shows_in_the_first_scrape_after_the_window(tmp_path: Path) -> None:
    app, counting = app_with(tmp_path, "0.2s")
    client = TestClient(app)  # type: ignore[arg-type]
    assert "bench_value 1.0" in client.get("/metrics").text
    counting.value = 2.0
    wait_for(lambda: "bench_value 2.0" in client.get("/metrics").text, 15, 0.05, "the new value in /metrics")


def test_within_the_window_the_same_rendering_is_served(tmp_path: Path) -> None:
    app, counting = app_with(tmp_path, "1h")
    client = TestClient(app)  # type: ignore[arg-type]
    first = client.get("/metrics").text
    counting.value = 2.0
    assert client.get("/metrics").text == first
    assert counting.collects == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_renders_again_only_when_the_window_has_passed() -> None:
    clock = FakeClock()
    bodies = iter([b"one", b"two", b"three"])
    cache = ExpositionCache(lambda: next(bodies), 1.0, clock)
    assert cache.get() == b"one"
    clock.now += 0.999
    assert cache.get() == b"one"
    clock.now += 0.001
    assert cache.get() == b"two"
    assert cache.renders == 2
    zero = ExpositionCache(lambda: next(bodies), 0.0, clock)
    assert zero.get() == b"three"


def test_a_failed_render_caches_nothing() -> None:
    calls: list[int] = []

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("collector failed")
        return b"ok"

    cache = ExpositionCache(render, 60.0, FakeClock())
    with pytest.raises(RuntimeError):
        cache.get()
    assert cache.get() == b"ok"
    assert cache.renders == 1
