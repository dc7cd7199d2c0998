"""Chaos: four simulated instances under SIGKILL, SIGSTOP, slow starts and out-of-memory errors.

A real machine (supervisord, the monitor, four simulator instances) takes a random fault every
1-3 s for CHAOS_SECONDS (default 20 s; the slow variant 120 s) while /healthz is polled at 5 Hz
and /metrics scraped at 1 Hz. Afterwards every instance is READY within 30 s, /healthz answered
every poll, ``comfyui_instance_restarts_total`` accounts for every crash and hang we caused, and
`down` leaves no process, socket, port or held lock. The test prints its figures and writes
nothing: bench/chaos_report.py runs it and writes bench/results/chaos_<seconds>.json for the
README, with the timing bounds (30 s to READY, latencies) that this test does not assert.

    pytest tests/reliability/test_chaos.py                                # 20 s
    CHAOS_SECONDS=120 pytest -m slow tests/reliability/test_chaos.py      # the long run
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import Machine, answers, http_client, wait_until

from orchestrator.machine.ports import port_free

pytestmark = pytest.mark.integration

NUM_INSTANCES = 4
KINDS = ("kill", "stop", "slow_start", "oom")
CRASHES = frozenset({"kill", "stop", "slow_start"})  # injections that must end in a new process
SLOW_START = 3.0  # seconds the simulator waits before binding its port
# Seconds: the deadline for every instance READY again after the chaos. Only a machine that
# never recovers fails here; the 30 s bound of issue 8 is checked by bench/chaos_report.py.
SETTLE_LIMIT = 120.0
HEALTHZ_PERIOD = 0.2  # 5 Hz
METRICS_PERIOD = 1.0  # 1 Hz
WATCH_PERIOD = 0.2


# ---------------------------------------------------------------- background observers
class Periodic(threading.Thread):
    """Calls ``fn`` every ``period`` seconds on a fixed schedule until stopped."""

    def __init__(self, name: str, period: float, fn: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.period = period
        self.fn = fn
        self.halt = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.is_set():
            self.fn()
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a slow answer): keep the rate, do not burst
                next_at = time.monotonic()
                delay = 0
            self.halt.wait(delay)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


class HealthzPoller:
    def __init__(self, url: str) -> None:
        self.url = url
        # A slow answer on a loaded box is not a failed one (latency: bench/chaos_report.py).
        self.client = http_client(timeout=15.0, trust_env=False)
        self.polls = 0
        self.last_poll = 0.0  # time.monotonic() when the latest poll began
        self.ok = 0
        self.answered = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.t0 = time.monotonic()

    def __call__(self) -> None:
        start = time.monotonic()
        self.polls += 1
        self.last_poll = start
        try:
            resp = self.client.get(self.url)
        except requests.RequestException as exc:
            self.failures.append(f"t={start - self.t0:.1f}s {type(exc).__name__}")
            return
        self.latencies.append(time.monotonic() - start)
        self.answered += 1
        if resp.status_code == 200:
            self.ok += 1
        else:
            self.failures.append(f"t={start - self.t0:.1f}s HTTP {resp.status_code}: {resp.text[:200]}")


def restarts_by_gpu(text: str) -> dict[int, float]:
    """``comfyui_instance_restarts_total`` per GPU, parsed as Prometheus does."""
    out: dict[int, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "comfyui_instance_restarts":
            for sample in family.samples:
                if sample.name == "comfyui_instance_restarts_total":
                    out[int(sample.labels["gpu"])] = sample.value
    return out


class MetricsScraper:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = http_client(timeout=15.0, trust_env=False)
        self.scrapes = 0
        self.failures: list[str] = []
        self.series: list[dict[int, float]] = []
        self.latencies: list[float] = []
        self.t0 = time.monotonic()

    def __call__(self) -> None:
        self.scrapes += 1
        start = time.monotonic()
        try:
            text = self.client.get(self.url).text
            self.series.append(restarts_by_gpu(text))
        except (requests.RequestException, ValueError) as exc:
            self.failures.append(f"t={start - self.t0:.1f}s {type(exc).__name__}: {exc}")
            return
        self.latencies.append(time.monotonic() - start)

    def decreases(self) -> list[str]:
        """A counter never goes down: every place one did."""
        bad = []
        for before, after in zip(self.series, self.series[1:], strict=False):
            for gpu, value in before.items():
                if after.get(gpu, value) < value:
                    bad.append(f"gpu {gpu}: {value} -> {after[gpu]}")
        return bad


class Watcher:
    """The monitor's /instances at 5 Hz, and every process of the machine ever seen."""

    def __init__(self, m: Machine, sup_pid: int) -> None:
        self.url = f"{m.monitor_url}/instances"
        self.client = http_client(timeout=2.0, trust_env=False)
        self.sup_pid = sup_pid
        self.latest: dict[int, dict[str, Any]] = {}
        self.seen: set[tuple[int, float]] = set()  # (pid, create_time): immune to pid reuse
        self.lock = threading.Lock()
        self.ticks = 0

    def __call__(self) -> None:
        self.ticks += 1
        with contextlib.suppress(requests.RequestException, ValueError):
            items = self.client.get(self.url).json()["instances"]
            with self.lock:
                self.latest = {int(i["gpu"]): i for i in items}
        if self.ticks % 5 == 0:
            self.record_tree()

    def record_tree(self) -> None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.sup_pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    self.seen.add((p.pid, p.create_time()))

    def snapshot(self) -> dict[int, dict[str, Any]]:
        with self.lock:
            return dict(self.latest)


def alive(pid: int, create_time: float | None = None) -> bool:
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.01:
            return False  # the pid was reused by an unrelated process
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def held_locks(root: Path) -> list[str]:
    """Lock files under ``root`` that some process still holds."""
    held = []
    for path in root.rglob("*.lock"):
        if not path.is_file():
            continue
        with path.open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(str(path))
            else:
                fcntl.flock(fh, fcntl.LOCK_UN)
    return held


# ---------------------------------------------------------------- the chaos itself
@dataclasses.dataclass
class Injection:
    kind: str
    gpu: int
    pid: int
    at: float  # seconds since the chaos began
    at_wall: float = dataclasses.field(default_factory=time.time)  # epoch seconds, as the monitor shows times
    recovered_after: float | None = None  # seconds until READY with a new process


class Chaos:
    def __init__(self, m: Machine, watcher: Watcher, rng: random.Random) -> None:
        self.m = m
        self.watcher = watcher
        self.rng = rng
        self.t0 = time.monotonic()
        self.injections: list[Injection] = []
        self.expected = dict.fromkeys(range(m.num_gpus), 0)  # restarts we caused, per GPU
        self.pending: dict[int, Injection] = {}  # waiting for a new READY process
        self.faults: dict[int, dict[str, Any]] = {g: {} for g in range(m.num_gpus)}
        self.cleanups: list[tuple[float, int, str]] = []  # (due, gpu, fault key to remove)
        self.stopped: list[tuple[int, float]] = []  # SIGSTOPped processes (pid, create_time)
        self.oom_printed: dict[int, int] = {}  # per GPU: OOM errors in its log before the latest oom fault
        self.deferred = 0
        self.bag: list[str] = []
        # restarts the monitor counted before the chaos: ours are counted on top of these
        self.baseline = {g: int(i["restarts"]) for g, i in watcher.snapshot().items()}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def ooms_printed(self, gpu: int) -> int:
        """CUDA OOM errors in the instance's log so far (all its processes: one file)."""
        try:
            return self.m.layout.instance_log(gpu).read_text(errors="replace").count("torch.OutOfMemoryError")
        except OSError:
            return 0

    def fault_file(self, gpu: int) -> Path:
        return self.m.layout.instance_dir(gpu) / "user" / "simulator_faults.json"

    def write_faults(self, gpu: int) -> None:
        path = self.fault_file(gpu)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.faults[gpu]))
        os.replace(tmp, path)  # the simulator never reads a half-written file

    def next_kind(self) -> str:
        # Random order, yet every kind equally often: a short run still sees all four.
        if not self.bag:
            self.bag = list(KINDS)
            self.rng.shuffle(self.bag)
        return self.bag[-1]

    def eligible(self) -> list[dict[str, Any]]:
        snap = self.watcher.snapshot()
        busy = set(self.pending) | {g for _, g, _ in self.cleanups}
        return [
            info
            for gpu, info in sorted(snap.items())
            # Only a READY process the monitor has seen (its pid is the one /instances shows) and
            # whose earlier restarts it has counted: a second hit before the monitor saw the first
            # replacement would merge two crashes into one new process.
            if info["state"] == "READY" and info["pid"]
            and info["restarts"] - self.baseline.get(gpu, 0) >= self.expected[gpu]
            and gpu not in busy
        ]

    def inject(self) -> bool:
        candidates = self.eligible()
        if not candidates:
            self.deferred += 1
            return False
        kind = self.bag[-1]
        target = self.rng.choice(candidates)
        gpu, pid = int(target["gpu"]), int(target["pid"])
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:  # the snapshot is up to 0.2 s old: that process is already gone
            self.deferred += 1
            return False
        inj = Injection(kind, gpu, pid, self.now())
        try:
            if kind == "kill":
                os.kill(pid, signal.SIGKILL)
            elif kind == "stop":
                os.kill(pid, signal.SIGSTOP)  # left stopped: the monitor must notice and restart it
                self.stopped.append((pid, created))
            elif kind == "slow_start":
                self.faults[gpu]["start_delay"] = SLOW_START  # read by the next process at its start
                self.write_faults(gpu)
                os.kill(pid, signal.SIGKILL)
            else:  # oom: printed once when the simulator re-reads its fault file (every 0.5 s)
                self.oom_printed[gpu] = self.ooms_printed(gpu)
                self.faults[gpu]["oom"] = 0
                self.write_faults(gpu)
                # removed once the instance printed it (or, failing that, after 60 s)
                self.cleanups.append((self.now() + 60, gpu, "oom"))
        except ProcessLookupError:
            self.faults[gpu].pop("start_delay", None)
            self.write_faults(gpu)
            self.deferred += 1
            return False
        self.bag.pop()
        if kind in CRASHES:
            self.expected[gpu] += 1
            self.pending[gpu] = inj
        self.injections.append(inj)
        return True

    def housekeeping(self) -> None:
        now = self.now()
        for due, gpu, key in list(self.cleanups):
            if now >= due or (key == "oom" and self.ooms_printed(gpu) > self.oom_printed[gpu]):
                self.faults[gpu].pop(key, None)
                self.write_faults(gpu)
                self.cleanups.remove((due, gpu, key))
        snap = self.watcher.snapshot()
        for gpu, inj in list(self.pending.items()):
            info = snap.get(gpu, {})
            # READY *entered after* the injection: /instances takes the pid from the latest
            # supervisord poll but the state from the last decision, so for up to a tick a new,
            # still-starting process can show up next to the READY of the one we killed.
            if (
                info.get("state") == "READY" and info.get("pid") and info["pid"] != inj.pid
                and float(info.get("since") or 0) > inj.at_wall
            ):
                inj.recovered_after = now - inj.at
                del self.pending[gpu]
                if inj.kind == "slow_start":
                    self.faults[gpu].pop("start_delay", None)
                    self.write_faults(gpu)

    def run(self, seconds: float) -> None:
        """Inject for ``seconds``, and on until every kind of fault has been injected once (a loaded
        box defers injections while instances recover); at most 5 × ``seconds`` in all."""
        end = self.t0 + seconds
        cap = self.t0 + 5 * seconds
        next_at = time.monotonic() + self.rng.uniform(1, 3)
        while time.monotonic() < end or (
            time.monotonic() < cap and {i.kind for i in self.injections} != set(KINDS)
        ):
            self.housekeeping()
            if time.monotonic() >= next_at:
                self.next_kind()
                # when every instance is still recovering, try again soon
                delay = self.rng.uniform(1, 3) if self.inject() else 0.2
                next_at = time.monotonic() + delay
            time.sleep(0.05)

    def clear_faults(self) -> None:
        for gpu in self.faults:
            self.faults[gpu] = {}
            with contextlib.suppress(FileNotFoundError):
                self.fault_file(gpu).unlink()
        self.cleanups.clear()

    def settle(self, limit: float) -> float | None:
        """Seconds until every instance is READY, every crash has its new process and every fault
        that was injected has done its work (a slow start really started slowly, an OOM was printed)."""
        start = time.monotonic()
        while time.monotonic() - start < limit:
            self.housekeeping()
            snap = self.watcher.snapshot()
            if not self.pending and not self.cleanups and len(snap) == self.m.num_gpus and all(
                i["state"] == "READY" for i in snap.values()
            ):
                return time.monotonic() - start
            time.sleep(0.1)
        return None


# ---------------------------------------------------------------- the run
def chaos_run(make: Callable[..., Machine], seconds: float) -> dict[str, Any]:
    seed = int(os.environ.get("CHAOS_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    m = make(NUM_INSTANCES)
    m.up()
    assert m.wait_all_answer(90), m.run("status").stdout
    # the monitor is a supervisord program of its own: the chaos starts once it answers too
    assert wait_until(lambda: answers(m.monitor_port, "/readyz"), 60, 0.2), m.run("status").stdout
    sup_pid = int(m.status()["supervisord"]["pid"])
    watcher = Watcher(m, sup_pid)
    healthz = HealthzPoller(f"{m.monitor_url}/healthz")
    metrics = MetricsScraper(f"{m.monitor_url}/metrics")
    threads = [
        Periodic("watch", WATCH_PERIOD, watcher),
        Periodic("healthz", HEALTHZ_PERIOD, healthz),
        Periodic("metrics", METRICS_PERIOD, metrics),
    ]
    for t in threads:
        t.start()
    try:
        ready = Chaos(m, watcher, rng)
        assert ready.settle(60) is not None, f"not READY before the chaos: {watcher.snapshot()}"
        watcher.record_tree()
        baseline = restarts_by_gpu(requests.get(f"{m.monitor_url}/metrics", timeout=5).text)
        assert wait_until(lambda: healthz.polls > 0 and metrics.scrapes > 0, 60, 0.1)  # observed from the start
        chaos = Chaos(m, watcher, rng)
        chaos.run(seconds)
        chaos_ended = time.monotonic()
        settle = chaos.settle(SETTLE_LIMIT)
        chaos.clear_faults()
        # a few more polls and at least one scrape of the settled machine
        polls, scrapes = healthz.polls, metrics.scrapes
        assert wait_until(lambda: healthz.polls >= polls + 3 and metrics.scrapes >= scrapes + 1, 60, 0.1)
    finally:
        for t in threads:
            t.stop()
    watcher.record_tree()
    final = restarts_by_gpu(requests.get(f"{m.monitor_url}/metrics", timeout=5).text)
    monitor_log = (m.root / "logs" / "monitor.log").read_text(errors="replace")

    down_start = time.monotonic()
    r = m.down()
    down_seconds = time.monotonic() - down_start

    by_kind = Counter(i.kind for i in chaos.injections)
    caused = sum(chaos.expected.values())
    counted = sum(final.get(g, 0) - baseline.get(g, 0) for g in range(m.num_gpus))
    recoveries = [i.recovered_after for i in chaos.injections if i.recovered_after is not None]
    figures: dict[str, Any] = {
        "seconds": seconds,
        "seed": seed,
        "instances": m.num_gpus,
        "injections": dict(sorted(by_kind.items())),
        "injections_total": len(chaos.injections),
        "deferred_injection_attempts": chaos.deferred,
        "healthz_polls": healthz.polls,
        "healthz_ok": healthz.ok,
        "healthz_answered": healthz.answered,
        "healthz_availability_percent": round(100.0 * healthz.ok / max(1, healthz.polls), 3),
        "healthz_latency_p50_ms": round(1000 * statistics.median(healthz.latencies), 1) if healthz.latencies else None,
        "healthz_latency_max_ms": round(1000 * max(healthz.latencies), 1) if healthz.latencies else None,
        "metrics_scrapes": metrics.scrapes,
        "metrics_scrape_failures": len(metrics.failures),
        "metrics_scrape_failure_detail": metrics.failures[:5],
        "healthz_failure_detail": healthz.failures[:5],
        "metrics_latency_max_ms": round(1000 * max(metrics.latencies), 1) if metrics.latencies else None,
        "crashes_and_hangs_injected": caused,
        "restarts_counted": counted,
        "recovery_seconds_max": round(max(recoveries), 2) if recoveries else None,
        "recovery_seconds_median": round(statistics.median(recoveries), 2) if recoveries else None,
        "recovery_seconds_max_by_kind": {
            k: round(max(i.recovered_after for i in chaos.injections if i.kind == k and i.recovered_after), 2)
            for k in sorted(CRASHES)
            if any(i.kind == k and i.recovered_after for i in chaos.injections)
        },
        "settle_seconds": None if settle is None else round(settle, 2),
        "down_seconds": round(down_seconds, 2),
        "oom_events_in_monitor_log": monitor_log.count("out-of-memory error"),
        "injection_log": [
            {"kind": i.kind, "gpu": i.gpu, "pid": i.pid, "at": round(i.at, 2),
             "recovered_after": None if i.recovered_after is None else round(i.recovered_after, 2)}
            for i in chaos.injections
        ],
    }
    print_figures(figures)  # bench/chaos_report.py keeps these figures; the test writes nothing

    # -------------------------------------------------------- what must hold
    assert settle is not None, f"not every instance READY within {SETTLE_LIMIT}s: {watcher.snapshot()}"
    assert set(by_kind) == set(KINDS), f"every kind of fault was injected: {dict(by_kind)}"
    # really polled throughout: from before the chaos until after it (the rate: bench/chaos_report.py)
    assert healthz.last_poll > chaos_ended, figures
    assert healthz.ok == healthz.polls, f"/healthz failed {len(healthz.failures)} polls: {healthz.failures[:10]}"
    assert metrics.scrapes > 0
    assert not metrics.failures, metrics.failures[:5]
    assert not metrics.decreases(), metrics.decreases()
    # >= and not ==: the monitor also restarts on its own (two out-of-memory errors within its
    # window force a restart; a probe that times out three times on this loaded 2-core box is a
    # hang to it), and a restart it does for a SIGSTOP counts exactly like the crash. What must
    # never happen is a crash we caused going uncounted: every injected crash/hang is a new
    # process the monitor saw, per instance as well as in total.
    for gpu in range(m.num_gpus):
        got = final.get(gpu, 0) - baseline.get(gpu, 0)
        assert got >= chaos.expected[gpu], f"gpu {gpu}: {got} restarts counted, {chaos.expected[gpu]} caused"
    assert counted >= caused
    for inj in chaos.injections:
        if inj.kind == "slow_start":
            assert inj.recovered_after is not None, inj
            assert inj.recovered_after >= SLOW_START - 0.5, inj
    # Every OOM line was noticed (POST /free, or a restart after the second one in the window).
    assert figures["oom_events_in_monitor_log"] >= by_kind["oom"], monitor_log[-3000:]
    # A SIGSTOPped process is gone without anyone sending it SIGCONT from here.
    assert not [p for p, ct in chaos.stopped if alive(p, ct)]

    # -------------------------------------------------------- after down: nothing left
    assert r.returncode == 0, r.stderr + r.stdout
    survivors = [(p, ct) for p, ct in watcher.seen if alive(p, ct)]
    assert not survivors, [psutil.Process(p).cmdline() for p, _ in survivors if alive(p)]
    assert not m.layout.socket.exists()
    assert not m.layout.supervisord_pid.exists()
    busy = [p for p in [*m.ports, m.monitor_port] if not port_free(p)]
    assert not busy, f"ports still bound after down: {busy}"
    assert not held_locks(m.root)
    return figures


def print_figures(f: dict[str, Any]) -> None:
    rows = [
        ("duration", f"{f['seconds']:.0f} s, {f['instances']} instances, seed {f['seed']}"),
        ("injections", ", ".join(f"{k} {v}" for k, v in f["injections"].items()) + f" (total {f['injections_total']})"),
        ("/healthz polls", f"{f['healthz_ok']}/{f['healthz_polls']} answered 200 ({f['healthz_availability_percent']}%)"),
        ("/healthz latency", f"p50 {f['healthz_latency_p50_ms']} ms, max {f['healthz_latency_max_ms']} ms"),
        ("/metrics scrapes", f"{f['metrics_scrapes']} ({f['metrics_scrape_failures']} failed), max {f['metrics_latency_max_ms']} ms"),
        ("restarts counted", f"{f['restarts_counted']} (crashes + hangs injected: {f['crashes_and_hangs_injected']})"),
        ("time to READY", f"max {f['recovery_seconds_max']} s, median {f['recovery_seconds_median']} s, by kind {f['recovery_seconds_max_by_kind']}"),
        ("settle after chaos", f"{f['settle_seconds']} s (limit {SETTLE_LIMIT:.0f} s)"),
        ("down", f"{f['down_seconds']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


@pytest.mark.timeout(600)  # the deadlines above only end a run that never recovers
def test_short_chaos_every_instance_recovers_healthz_never_fails_and_restarts_are_counted(
    machine: Callable[..., Machine],
) -> None:
    chaos_run(machine, float(os.environ.get("CHAOS_SECONDS", "20")))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_long_chaos_every_instance_recovers_healthz_never_fails_and_restarts_are_counted(
    machine: Callable[..., Machine],
) -> None:
    chaos_run(machine, float(os.environ.get("CHAOS_SECONDS", "120")))
