"""Rolling restart: instances restarted a few at a time (ROLLING_MAX_UNAVAILABLE, default 1), each
drained first, so a serving machine takes a change without losing a job.

Per batch: ask the monitor to drain each instance (``POST /instances/{gpu}/drain``: no new jobs,
wait until its prompts are done, DRAIN_TIMEOUT then interrupt), restart it in supervisord on its new
config (stop, remove and add the group: the new ``environment=`` and command apply), wait until it
is READY on the new generation, route to it again, then the next batch. When the new generation
does not become READY (a broken node, a bad flag) the roll stops there: the instances not yet
rolled keep serving the old generation, and :class:`RollReport` names the instance and the log
line that explains it. Without a monitor (not running, or not answering) there is nothing to
drain: instances are restarted one batch at a time and their readiness is probed directly.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from orchestrator.core.errors import SupervisorError
from orchestrator.core.plan import Instance
from orchestrator.core.settings import Settings
from orchestrator.core.states import ProcessState
from orchestrator.lifecycle.watch import log_tail
from orchestrator.machine.generation import process_generation
from orchestrator.machine.supervisor import Supervisor

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
POLL = 0.2  # seconds between readiness looks
_FAILED = frozenset({ProcessState.BACKOFF, ProcessState.FATAL, ProcessState.EXITED})
_EXPLAINS = re.compile(r"error|exception|not allowed|failed|no module|cannot|traceback", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class RollReport:
    """What a roll did: the instances restarted onto ``generation``, and where it stopped and why."""

    generation: str
    rolled: tuple[str, ...] = ()
    failed: str = ""  # the instance whose new generation did not become READY
    failure: str = ""  # one line: why (its state and the log line that explains it)
    left: tuple[str, ...] = ()  # not rolled: still on their old generation
    seconds: float = 0.0
    drained_by_monitor: bool = True

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rolled": list(self.rolled), "left": list(self.left)}


def monitor_base(settings: Settings) -> str:
    host = "127.0.0.1" if settings.orchestrator_listen in {"0.0.0.0", "::"} else settings.orchestrator_listen  # noqa: S104 - a comparison
    return f"http://{host}:{settings.orchestrator_port}"


class MonitorLink:
    """The monitor's HTTP API as the roll uses it (with the bearer token when one is set)."""

    def __init__(self, settings: Settings) -> None:
        self.base = monitor_base(settings)
        self.session = requests.Session()
        self.session.trust_env = False  # 127.0.0.1: never through a proxy
        if settings.orchestrator_token:
            self.session.headers["Authorization"] = f"Bearer {settings.orchestrator_token}"

    def answers(self, wait: float = 0.0) -> bool:
        deadline = time.monotonic() + wait
        while True:
            try:
                if self.session.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)

    def drain(self, gpu: int, timeout: float) -> dict[str, Any] | None:
        try:
            url = f"{self.base}/instances/{gpu}/drain"
            r = self.session.post(url, params={"timeout": timeout}, timeout=timeout + 30)
            return r.json() if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None

    def undrain(self, gpu: int) -> None:
        try:
            self.session.delete(f"{self.base}/instances/{gpu}/drain", timeout=5)
        except requests.RequestException as exc:
            log.warning("could not route to GPU %d again: %s", gpu, exc)

    def instance(self, gpu: int) -> dict[str, Any] | None:
        try:
            r = self.session.get(f"{self.base}/instances/{gpu}", timeout=2)
            data = r.json() if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None
        return data if isinstance(data, dict) else None


def explaining_line(lines: Sequence[str]) -> str:
    """The log line that says why (the last one that reads like an error), else the last line."""
    for line in reversed(lines):
        if _EXPLAINS.search(line):
            return line
    return lines[-1] if lines else "(its log is empty)"


def not_ready_reason(sup: Supervisor, name: str) -> str | None:
    """Why ``name`` cannot become READY (crash-looping: its state and log line), None while it may."""
    try:
        proc = sup.process(name)
    except SupervisorError as exc:
        return f"supervisord: {exc}"
    if proc.state in _FAILED:
        return f"{proc.state.name}: {explaining_line(log_tail(sup, name, 20))}"
    return None


def answers_directly(inst: Instance) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{inst.port}/system_stats", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def is_ready(inst: Instance, generation: str, sup: Supervisor, link: MonitorLink | None) -> bool:
    """READY on ``generation``: in the monitor's view when it answers, else by asking the instance."""
    if link is not None:
        data = link.instance(inst.index)
        if data is not None:
            return bool(data.get("ready")) and data.get("generation") == generation
    try:
        proc = sup.process(inst.name)
    except SupervisorError:
        return False
    return proc.state is ProcessState.RUNNING and process_generation(proc.pid) == generation and answers_directly(inst)


def wait_ready(
    inst: Instance, generation: str, sup: Supervisor, link: MonitorLink | None, timeout: float
) -> str | None:
    """Wait until ``inst`` is READY on ``generation``; returns why not (None when it is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_ready(inst, generation, sup, link):
            return None
        reason = not_ready_reason(sup, inst.name)
        if reason is not None:
            return reason
        time.sleep(POLL)
    return f"not READY after {timeout:g}s (STARTUP_TIMEOUT): {explaining_line(log_tail(sup, inst.name, 20))}"


def restart_on_new_config(sup: Supervisor, name: str) -> None:
    """Stop, remove and add the group: supervisord starts it with the config now on disk."""
    sup.stop(name)
    sup.remove_group(name)
    sup.add_group(name)


def roll(
    settings: Settings,
    sup: Supervisor,
    instances: Sequence[Instance],
    generation: str,
    *,
    progress: Progress = lambda _line: None,
    reload: bool = True,
) -> RollReport:
    """Restart ``instances`` in batches of ROLLING_MAX_UNAVAILABLE, each drained first (see module doc).

    ``reload``: apply the config on disk (stop/remove/add); False restarts the process as it is
    (``restart all --rolling``). ``progress`` gets one line per step.
    """
    start = time.monotonic()
    link: MonitorLink | None = MonitorLink(settings)
    if link is not None and not link.answers(wait=15.0):
        progress("the monitor does not answer: nothing to drain, restarting one batch at a time")
        link = None
    size = max(1, settings.rolling_max_unavailable)
    rolled: list[str] = []
    todo = list(instances)
    while todo:
        batch, todo = todo[:size], todo[size:]
        for inst in batch:
            progress(f"{inst.name}: draining")
        if link is not None:
            with ThreadPoolExecutor(len(batch)) as pool:
                results = list(pool.map(lambda i: link.drain(i.index, settings.drain_timeout), batch))
            for inst, res in zip(batch, results, strict=True):
                if res is None:
                    progress(f"{inst.name}: the monitor did not drain it; restarting anyway")
                elif not res.get("drained"):
                    cut = res.get("interrupted", 0)
                    progress(f"{inst.name}: drain timed out (DRAIN_TIMEOUT); {cut} prompt(s) interrupted")
                else:
                    progress(f"{inst.name}: drained in {float(res.get('waited', 0)):.1f}s")
        failed, failure = "", ""
        try:
            for inst in batch:
                progress(f"{inst.name}: restarting")
                if reload:
                    restart_on_new_config(sup, inst.name)
                else:
                    sup.restart(inst.name)
            for inst in batch:
                why = wait_ready(inst, generation, sup, link, settings.startup_timeout)
                if why is not None and not failed:
                    failed, failure = inst.name, why
                elif why is None:
                    rolled.append(inst.name)
                    progress(f"{inst.name}: READY on generation {generation}")
        finally:
            # The instance that failed stays planned out (its drain mark expires by itself), so
            # /readyz with the default MIN_READY_INSTANCES keeps counting the others as enough.
            if link is not None:
                for inst in batch:
                    if inst.name != failed:
                        link.undrain(inst.index)
        if failed:
            left = tuple(i.name for i in todo)
            return RollReport(generation, tuple(rolled), failed, settings.redact(failure), left,
                              round(time.monotonic() - start, 3), link is not None)
    return RollReport(generation, tuple(rolled), seconds=round(time.monotonic() - start, 3),
                      drained_by_monitor=link is not None)


@dataclasses.dataclass(frozen=True)
class Serving:
    """One instance after ``up --wait``: READY on the current generation (``url``), or why not."""

    name: str
    url: str
    ready: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _crash_looping(sup: Supervisor, name: str, pids: dict[str, set[int]]) -> str | None:
    """Why ``name`` will not become READY: crash-looping in supervisord, or restarted (by the
    monitor) twice since the wait began without ever being READY; None while it may still."""
    why = not_ready_reason(sup, name)
    if why is not None:
        return why
    try:
        pid = sup.process(name).pid
    except SupervisorError:
        return None
    seen = pids.setdefault(name, set())
    if pid:
        seen.add(pid)
    if len(seen) >= 3:
        return f"crash-looping ({len(seen) - 1} restarts while waiting): {explaining_line(log_tail(sup, name, 20))}"
    return None


def wait_serving(
    settings: Settings, sup: Supervisor, instances: Sequence[Instance], generation: str, timeout: float,
    *, progress: Progress = lambda _line: None,
) -> list[Serving]:
    """Wait until every instance is READY on ``generation`` (at most ``timeout`` s); one
    :class:`Serving` each. A crash-looping instance is given up at once, with the log line that
    says why; one READY on an older generation (a roll that stopped) too."""
    link: MonitorLink | None = MonitorLink(settings)
    if link is not None and not link.answers(wait=min(15.0, timeout)):
        link = None
    deadline = time.monotonic() + timeout
    pending = {i.name: i for i in instances}
    out: dict[str, Serving] = {}
    pids: dict[str, set[int]] = {}
    while pending:
        for name, inst in sorted(pending.items()):
            url = f"http://127.0.0.1:{inst.port}"
            data = link.instance(inst.index) if link is not None else None
            if is_ready(inst, generation, sup, link):
                out[name] = Serving(name, url, True)
                progress(f"ready {sum(s.ready for s in out.values())}/{len(instances)}")
            elif data and data.get("ready") and data.get("generation") not in (None, generation):
                old = data.get("generation")  # no roll is under way: it stays there
                out[name] = Serving(name, url, False, f"READY on the old generation {old} (not rolled)")
            else:
                why = _crash_looping(sup, name, pids)
                if why is not None:
                    out[name] = Serving(name, url, False, settings.redact(why))
            if name in out:
                del pending[name]
        if pending and time.monotonic() >= deadline:
            for name, inst in pending.items():
                data = link.instance(inst.index) if link is not None else None
                state = f"{data.get('state')}: {data.get('reason')}" if data else "not READY"
                out[name] = Serving(name, f"http://127.0.0.1:{inst.port}", False,
                                    settings.redact(f"{state} after {timeout:g}s"))
            break
        if pending:
            time.sleep(POLL)
    return [out[i.name] for i in instances]

def restart_rolling(settings: Settings, target: str, progress: Progress = lambda _line: None) -> RollReport:
    """``restart all --rolling`` (or one GPU): the same processes restarted, each drained first.

    Raises:
        SupervisorError: nothing was started here, or supervisord is not running.
        PlanError: a bad ``target``.
    """
    from orchestrator.core.layout import Layout
    from orchestrator.lifecycle.control import select_instances
    from orchestrator.machine.generation import current_id
    from orchestrator.machine.state import applied_plan

    layout = Layout(settings.root)
    plan = applied_plan(layout)
    if plan is None:
        raise SupervisorError("nothing has been started here: run `orchestrator up`")
    sup = Supervisor(layout, timeout=settings.stop_timeout * 2 + 30)
    sup.require_running()
    targets = select_instances(plan, target)
    return roll(settings, sup, targets, current_id(layout) or "", progress=progress, reload=False)
