"""Helpers shared by the tests and the benchmarks: ports, polling, HTTP, git repos, servers, machines.

How to import it: ``from support import wait_for, ComfyServer, ...``. Under pytest ``tests/`` is on
``sys.path`` (rootdir-relative ``prepend`` import of the test modules), so the plain name works from
every test package; a bench script puts ``<repo>`` and ``<repo>/tests`` on ``sys.path`` before its
first import from here. It is a plain module, not a conftest: fixtures stay in ``tests/conftest.py``
and call into this module.

- :func:`free_port`: one free TCP port on 127.0.0.1.
- :func:`wait_for`: poll until truthy, return the value, or fail naming what was awaited;
  :func:`wait_until` is its boolean form for callers that decide what to do on a timeout.
- :func:`http_client`: a ``requests`` session with a base URL and a default timeout (the sync
  HTTP client of the tests; ``aiohttp`` where they need async or WebSocket).
- :class:`ComfyServer`: one ComfyUI started by hand (the simulator by default; real ComfyUI from
  ``tests/real`` given its interpreter and tree), as the orchestrator starts an instance.
- :class:`Machine` and :func:`simulated_machine`: a whole machine (`orchestrator up`, supervisord,
  the monitor) whose ComfyUI is the simulator, driven through the CLI.
- :data:`SECRET_MARKERS`, :func:`process_environ`, :func:`leaked_markers`: secrets in ``/proc/<pid>/environ``.
- :class:`Recording`: wraps a command runner (git, pip) and records every argv it is given.
- :func:`build_wheel`, :func:`install_fake_dist`, :func:`package_index` / :func:`simple_index`:
  tiny wheels, a distribution dropped into a venv, and a local PEP 503 index served over HTTP.
- :func:`jobs_app`: the job API (``jobs_router``) as a FastAPI app whose lifespan runs a ``JobManager``.
- :func:`freeze_machine`, :func:`kill_machine`: SIGSTOP / SIGKILL a machine's supervisord, its
  programs and instances at once.
- :class:`RedisServer`: a real ``redis-server`` on a free port (the fleet's job queue).
- :func:`txt2img`: the default text-to-image workflow, small; :func:`seed_below_min_node_errors`:
  ComfyUI's ``node_errors`` for that workflow with seed -1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
import requests

from orchestrator.machine.ports import free_port_block

if TYPE_CHECKING:
    from fastapi import FastAPI

    from orchestrator.jobs.tracker import JobManager

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


# ---------------------------------------------------------------- ports and polling
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_port_block(1)


def wait_for(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy, and return that.

    Raises:
        AssertionError: not truthy within ``timeout`` seconds (a failed expectation, for pytest);
            the message names ``what`` was awaited.
    """
    result = _poll(check, timeout, interval)
    if not result:
        raise AssertionError(f"timed out after {timeout} s waiting for {what or 'the condition'}")
    return result


def wait_until(check: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """:func:`wait_for` as a bool: for ``if not wait_until(...)`` recovery and lazy failure messages."""
    return bool(_poll(check, timeout, interval))


def _poll(check: Callable[[], T], timeout: float, interval: float) -> T:
    """``check()`` every ``interval`` s until truthy or past ``timeout`` s; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


# ---------------------------------------------------------------- HTTP
class BaseUrlSession(requests.Session):
    """``requests.Session`` whose relative URLs (``"/queue"``) go to ``base_url``, with a default timeout."""

    def __init__(self, base_url: str, timeout: float) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout)
        if isinstance(url, str) and url.startswith("/"):
            url = self.base_url + url
        return super().request(method, url, *args, **kwargs)


def http_client(base_url: str = "", timeout: float = 5.0, trust_env: bool = True) -> BaseUrlSession:
    """The tests' sync HTTP client (``httpx.Client(base_url=, timeout=)`` before); close it or use ``with``.

    ``trust_env=False`` ignores proxy variables from the environment.
    """
    session = BaseUrlSession(base_url, timeout)
    session.trust_env = trust_env
    return session


def answers(port: int, path: str = "/system_stats", timeout: float = 1.0) -> bool:
    """Whether 127.0.0.1:``port`` answers ``path`` with 200."""
    try:
        return requests.get(f"http://127.0.0.1:{port}{path}", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


# ---------------------------------------------------------------- secrets in process environments
# Every secret a machine may be given, each set to a unique marker: a process environment holding
# one of these values holds that secret.
SECRET_MARKERS = {
    "ORCHESTRATOR_TOKEN": "tok-MARKER-7f3a", "HF_TOKEN": "hf-MARKER-7f3a", "CIVITAI_TOKEN": "civ-MARKER-7f3a",
    "SSH_PRIVATE_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----ssh-MARKER-7f3a", "CUT_PK_1": "pk-MARKER-7f3a",
    "AWS_SECRET_ACCESS_KEY": "aws-MARKER-7f3a", "AZURE_STORAGE_KEY": "az-MARKER-7f3a",
    "OPENAI_API_KEY": "oa-MARKER-7f3a", "SOME_SERVICE_PASSWORD": "pw-MARKER-7f3a",
}


def process_environ(pid: int) -> bytes:
    """``/proc/<pid>/environ``: the NUL-separated environment the process was started with."""
    return Path(f"/proc/{pid}/environ").read_bytes()


def leaked_markers(pid: int, allowed: frozenset[str] = frozenset()) -> list[str]:
    """The names of :data:`SECRET_MARKERS` whose value is in ``pid``'s environment, but ``allowed``."""
    env = process_environ(pid)
    return [name for name, value in SECRET_MARKERS.items() if name not in allowed and value.encode() in env]


# ---------------------------------------------------------------- environment and git
# Variables a developer's shell might set that would change what a test machine does.
_SCRUB = {"MOCK_GPU", "NUM_GPUS", "TEST_GPUS", "GPUS", "ROOT", "COMFY_ARGS", "COMFY_FLAGS", "ORCHESTRATOR_TOKEN",
          "ORCHESTRATOR_CONFIG", "SHARED_REPO_URL", "WORKER_BASE_COMFYUI_PORT", "ORCHESTRATOR_PORT"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the machine-shaping variables and SIM_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("SIM_")}
    env.update(extra)
    return env


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "init.defaultBranch=main",
         "-c", "protocol.file.allow=always", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def make_repo(path: Path, files: dict[str, str], branch: str = "main") -> str:
    """Create a git repo with ``files`` committed on ``branch``; returns the commit sha."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", branch)
    for rel, text in files.items():
        f = path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "init")
    return git(path, "rev-parse", "HEAD")


def commit_file(path: Path, rel: str, text: str, message: str = "change") -> str:
    f = path / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)
    return git(path, "rev-parse", "HEAD")


class Recording:
    """A command runner (``git_runner``, ``run_command``) that records each argv and then runs it.

    ``calls`` holds every argv as a list, in order; each call goes on to ``runner`` with the same
    arguments, so the wrapper fits wherever the wrapped runner does.
    """

    def __init__(self, runner: Callable[..., Any]) -> None:
        self.runner = runner
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], **kwargs: Any) -> Any:
        self.calls.append(list(argv))
        return self.runner(argv, **kwargs)


# ---------------------------------------------------------------- workflows and the job API
def txt2img(
    prefix: str,
    seed: int = 1,
    steps: int = 4,
    width: int = 64,
    height: int = 48,
    batch: int = 1,
    text: str = "a cat",
) -> dict[str, Any]:
    """The default text-to-image workflow in API format, small enough for the simulator.

    The graph of ``examples/workflow.json`` (same nodes and links) with test-sized values: a tiny
    latent, few steps, a short prompt, and the SaveImage ``filename_prefix`` given.
    """
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": batch},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def seed_below_min_node_errors() -> dict[str, Any]:
    """ComfyUI's ``node_errors`` (POST /prompt, 400) for the default workflow with seed -1 on node 3."""
    return {
        "3": {
            "errors": [
                {
                    "type": "value_smaller_than_min",
                    "message": "Value -1 smaller than min of 0",
                    "details": "seed",
                    "extra_info": {"input_name": "seed"},
                }
            ],
            "dependent_outputs": ["9"],
            "class_type": "KSampler",
        }
    }


def jobs_app(manager: JobManager) -> FastAPI:
    """The job API as the monitor serves it: ``jobs_router(manager)``, the manager started and
    closed by the app's lifespan. Serve it with uvicorn."""
    from fastapi import FastAPI

    from orchestrator.jobs.routes import jobs_router

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await manager.start()
        yield
        await manager.close()

    app = FastAPI(lifespan=lifespan)
    app.include_router(jobs_router(manager))
    return app


class ServedApp:
    """An ASGI app served by uvicorn on a free port in a thread of this process, until ``stop()``
    (also a context manager). ``url`` is its base URL."""

    def __init__(self, app: Any, port: int | None = None, timeout: float = 20) -> None:
        import threading

        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

        def started() -> bool:
            assert self.thread.is_alive(), "the server thread died"
            return bool(self.server.started)

        wait_for(started, timeout, 0.02, "uvicorn serving the app")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def __enter__(self) -> ServedApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- one ComfyUI, started by hand
def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """SIGCONT + SIGTERM, then SIGKILL: the process is gone when this returns; its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return int(proc.returncode)


class InstanceFolders:
    """What a started ComfyUI offers a test: its URL and the folders under ``base``, and its log."""

    port: int
    base: Path  # the instance folder: output/ temp/ input/ user/
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> Path:
        return self.base / "output"

    @property
    def input(self) -> Path:
        return self.base / "input"

    @property
    def user(self) -> Path:
        return self.base / "user"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ComfyServer(InstanceFolders):
    """One ComfyUI started by hand, as the orchestrator starts an instance: ``python main.py`` in
    ``tree`` with its own port and its output/temp/input/user folders under ``base``.

    The simulator by default (``tree`` written by ``write_code_tree``, this interpreter); real
    ComfyUI with ``python`` set to its venv's interpreter and ``kind="real"``. ``env`` adds to a
    clean environment (no SIM_* from the shell: pass them here). The output goes to ``log_path``
    (default ``base/comfyui.log``).
    """

    def __init__(
        self,
        tree: Path,
        base: Path,
        port: int | None = None,
        *args: str,
        python: Path | str = sys.executable,
        kind: str = "simulator",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.kind, self.python, self.tree, self.base = kind, python, tree, base
        self.port = port or free_port()
        for sub in ("output", "temp", "input", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.argv = [
            str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--output-directory", str(base / "output"), "--temp-directory", str(base / "temp"),
            "--input-directory", str(base / "input"), "--user-directory", str(base / "user"),
            "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}", "--disable-auto-launch", *args,
        ]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SIM_", "PYTHONPATH", "VIRTUAL_ENV"))}
        full_env.update({"PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "DO_NOT_TRACK": "1"})
        if kind == "simulator":  # the simulator is this repo's package: run it from here
            full_env["PYTHONPATH"] = str(REPO)
        full_env.update(env or {})
        self.log_path = log_path or base / "comfyui.log"
        self.started = time.monotonic()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=tree, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    def answers(self) -> bool:
        return answers(self.port, timeout=2.0)

    def ready(self) -> bool:
        """Whether it answers /system_stats; AssertionError (with its log) once it has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} ComfyUI exited {self.proc.returncode}:\n{self.log()[-3000:]}")
        return self.answers()

    def wait_ready(self, timeout: float = 120, interval: float = 0.05) -> float:
        """Seconds from start to the first 200 on /system_stats; AssertionError if it exits or times out."""
        if not wait_until(self.ready, max(0.0, self.started + timeout - time.monotonic()), interval):
            raise AssertionError(f"{self.kind} ComfyUI not answering after {timeout}s:\n{self.log()[-3000:]}")
        return time.monotonic() - self.started

    def stop(self) -> int:
        return stop_process(self.proc)


# ---------------------------------------------------------------- a whole machine under test
@dataclasses.dataclass
class Machine:
    """A ROOT run through the CLI (``python -m orchestrator``) with its environment."""

    root: Path
    env: dict[str, str]
    port_base: int
    monitor_port: int
    num_gpus: int

    @property
    def layout(self):  # type: ignore[no-untyped-def]
        from orchestrator.core.layout import Layout

        return Layout(self.root)

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def ports(self) -> list[int]:
        return [self.port_base + i for i in range(self.num_gpus)]

    def run(self, *args: str, check: bool = False, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            env={**self.env, **env}, capture_output=True, text=True, timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"orchestrator {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def up(self, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run("up", "--skip-provision", *extra, check=True, **env)

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.run("down", timeout=180)

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.run("status", "--json", check=True).stdout)

    def ready(self) -> bool:
        """Whether the monitor's /readyz answers 200."""
        return answers(self.monitor_port, "/readyz", timeout=2.0)

    def wait_all_answer(self, timeout: float = 60) -> bool:
        return wait_until(lambda: all(answers(p) for p in self.ports), timeout, 0.2)


# What a test machine changes from the product defaults: probes and stops fast enough for tests.
TEST_SETTINGS = {"PROBE_INTERVAL": "0.5", "PROBE_TIMEOUT": "1", "STOP_TIMEOUT": "5", "OUTPUT_MAX_AGE": "60m"}


def simulated_machine(root: Path, num_gpus: int = 2, *, fast: bool = True, **extra_env: str) -> Machine:
    """A Machine in ``root`` (created) whose ComfyUI is the simulator, on free ports, MOCK_GPU=1.

    Args:
        fast: add :data:`TEST_SETTINGS`; False keeps the product's defaults (what benchmarks measure).
        extra_env: settings on top (they win).

    Not started: call ``up()``, and ``down()`` at the end.
    """
    from orchestrator.simulator.tree import write_code_tree

    root.mkdir(parents=True, exist_ok=True)
    write_code_tree(root / "ComfyUI")
    base = free_port_block(num_gpus + 1)
    monitor_port = free_port_block(1)
    env = clean_env(
        ROOT=str(root), MOCK_GPU="1", NUM_GPUS=str(num_gpus), WORKER_BASE_COMFYUI_PORT=str(base),
        ORCHESTRATOR_PORT=str(monitor_port), SHARED_REPO_URL="",
    )
    env.update({**(TEST_SETTINGS if fast else {}), **extra_env})
    return Machine(root, env, base, int(env["ORCHESTRATOR_PORT"]), num_gpus)


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie counts: it no longer runs)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def readyz_code(m: Machine) -> int | None:
    """The monitor's /readyz status code, None when it does not answer."""
    try:
        return requests.get(f"{m.monitor_url}/readyz", timeout=2).status_code
    except requests.RequestException:
        return None


# ---------------------------------------------------------------- wheels and a local package index
def build_wheel(directory: Path, name: str, version: str, module: str, requires: Sequence[str] = ()) -> Path:
    """A minimal pure-Python wheel (``module.VERSION``), so pip and uv install something real offline."""
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": meta,
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{rel},,\n" for rel in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, text in files.items():
            zf.writestr(rel, text)
        zf.writestr(f"{dist}.dist-info/RECORD", record)
    return path


def install_fake_dist(python: Path, name: str, version: str, module: str | None = None) -> None:
    """Put an installed distribution straight into a venv (what pip would leave behind)."""
    site = next((python.parent.parent / "lib").glob("python3*/site-packages"))
    module = module or name.replace("-", "_")
    (site / module).mkdir()
    (site / module / "__init__.py").write_text(f"VERSION = {version!r}\n")
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("test\n")
    (info / "RECORD").write_text(f"{module}/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def simple_index(wheels: Path, dest: Path) -> Path:
    """(Re)write a PEP 503 layout ``dest/simple/<name>/`` of the wheels in ``wheels``; returns ``dest``."""
    import re
    import shutil

    simple = dest / "simple"
    names: dict[str, list[Path]] = {}
    for whl in sorted(wheels.glob("*.whl")):
        names.setdefault(re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower(), []).append(whl)
    for name, files in names.items():
        (simple / name).mkdir(parents=True, exist_ok=True)
        for whl in files:
            shutil.copy2(whl, simple / name / whl.name)
        links = "".join(f'<a href="{w.name}">{w.name}</a><br>\n' for w in files)
        (simple / name / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return dest


@contextlib.contextmanager
def package_index(wheels: Path, dest: Path) -> Iterator[str]:
    """A PEP 503 index (:func:`simple_index`) of the wheels, served by ``python -m http.server``
    on 127.0.0.1; yields its URL (for ``--index-url`` / PIP_INDEX_URL) and stops the server.
    Wheels added later are published by calling ``simple_index(wheels, dest)`` again."""
    simple_index(wheels, dest)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(dest)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: answers(port, "/simple/"), timeout=30, what="the local package index")
        yield f"http://127.0.0.1:{port}/simple"
    finally:
        stop_process(proc)
# ---------------------------------------------------------------- a real redis-server (the fleet's job queue)
class RedisServer:
    """A ``redis-server`` (the Debian package) on a free port with its own folder, no persistence;
    ``url`` is its redis:// URL. ``stop()`` ends it (also a context manager).
    Callers skip when :data:`REDIS_SERVER` is None (the binary is missing)."""

    def __init__(self, workdir: Path, port: int | None = None, password: str = "") -> None:
        assert REDIS_SERVER, "redis-server is not installed (apt-get install redis-server)"
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{self.port}/0"
        conf = workdir / "redis.conf"  # the password in a private file, not on the command line
        conf.write_text(f"requirepass {password}\n" if password else "")
        conf.chmod(0o600)
        argv = [REDIS_SERVER, str(conf), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
                "--save", "", "--appendonly", "no", "--daemonize", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self._answers(), 20, 0.05, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, f"redis-server exited {self.proc.returncode}"
        import redis

        try:
            return bool(redis.Redis(port=self.port, password=self.password or None, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


REDIS_SERVER = shutil.which("redis-server")


def freeze_machine(m: Machine) -> list[psutil.Process]:
    """SIGSTOP a whole machine: supervisord, everything under it (monitor, queue worker, instances)
    and any process whose command line names its ROOT. Returns them (for SIGCONT or SIGKILL)."""
    procs: dict[int, psutil.Process] = {}
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        sup = psutil.Process(int(m.layout.supervisord_pid.read_text().strip()))
        procs.update({p.pid: p for p in [sup, *sup.children(recursive=True)]})
    for p in psutil.process_iter(["cmdline"]):
        if str(m.root) in " ".join(p.info["cmdline"] or ()) and p.pid != os.getpid():
            procs[p.pid] = p
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGSTOP)
    return list(procs.values())


def signal_all(procs: Sequence[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def kill_machine(m: Machine, frozen: Sequence[psutil.Process] | None = None) -> list[int]:
    """SIGKILL a whole machine at once, as a power cut (frozen first with :func:`freeze_machine`,
    so that none reacts to another's death). Returns the pids killed once they are gone."""
    procs = list(frozen) if frozen is not None else freeze_machine(m)
    signal_all(procs, signal.SIGKILL)
    wait_for(lambda: all(gone(p.pid) for p in procs), 20, 0.05, f"the processes of {m.root} gone")
    return sorted(p.pid for p in procs)
