"""Crash safety: SIGKILL the orchestrator mid-clone, mid-pip and mid-download, then run `up` again.

Everything is real: local git repositories (file://) for ComfyUI, the shared config repo and
the custom nodes; a git wrapper that stalls one clone after it has written its files; pip
building a local project whose PEP 517 backend stalls (offline: PIP_NO_INDEX); a local HTTP
server that serves a model slowly. Each SIGKILL hits the whole process group, as a container
restart or the OOM killer would. After every kill: the state files parse, no half-cloned node
sits where ComfyUI looks, no partial model file has its final name; the next `up` completes.

The module also holds :class:`World`, the provisioning sources that test_secrets.py reuses.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import answers, clean_env, git, make_repo, wait_for, wait_until

from orchestrator.core.layout import Layout
from orchestrator.machine.ports import free_port_block
from orchestrator.provision.git import worktree as git_worktree
from orchestrator.provision.nodes import state as nodes_state

pytestmark = pytest.mark.integration

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"
SHIPPED_COMFY_DIR_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "comfy_dir_config.yaml"
NODE_INIT = "NODE_CLASS_MAPPINGS = {}\nNODE_DISPLAY_NAME_MAPPINGS = {}\n"


# ---------------------------------------------------------------- a slow, resumable file server
class ModelServer:
    """HTTP/1.1 with Range, optional bearer auth per path and a per-path byte rate."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.tokens: dict[str, str] = {}  # path → required bearer token
        self.rate: dict[str, float] = {}  # path → bytes per second (0: unthrottled)
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                server.requests.append({"path": path, "auth": self.headers.get("Authorization")})
                data = server.files.get(path)
                if data is None:
                    return self._plain(404, b"not found")
                token = server.tokens.get(path)
                if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    return self._plain(401, b'{"error": "unauthorized"}')
                start, status = 0, 200
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if match and int(match.group(1)) < len(data):
                    start, status = int(match.group(1)), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"v1"')
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for pos in range(0, len(body), 16384):
                        chunk = body[pos : pos + 16384]
                        self.wfile.write(chunk)
                        rate = server.rate.get(path, 0)
                        if rate:
                            time.sleep(len(chunk) / rate)
                return None

            def _plain(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- provisioning sources
SLOW_BACKEND = '''
import os, time, zipfile
NAME, VERSION = "orchtest_slowpkg", "1.0"
DIST = NAME + "-" + VERSION
HERE = os.path.dirname(os.path.abspath(__file__))

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    # The test switches the stall on with a file next to this backend.
    if os.path.exists(os.path.join(HERE, "STALL")):
        open(os.path.join(HERE, "STALL.started"), "w").close()
        time.sleep(300)
    files = {
        NAME + "/__init__.py": "VERSION = '1.0'\\n",
        DIST + ".dist-info/METADATA": "Metadata-Version: 2.1\\nName: " + NAME + "\\nVersion: " + VERSION + "\\n",
        DIST + ".dist-info/WHEEL": "Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    name = DIST + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for rel, text in files.items():
            zf.writestr(rel, text)
        zf.writestr(DIST + ".dist-info/RECORD", "".join(r + ",,\\n" for r in files) + DIST + ".dist-info/RECORD,,\\n")
    return name
'''

GIT_WRAPPER = """#!/bin/sh
# Stalls the clone of a repository whose URL contains $STALL_CLONE, after git wrote its files.
if [ -n "$STALL_CLONE" ] && [ -e "$STALL_SWITCH" ]; then
  case " $* " in
    *" clone "*"$STALL_CLONE"*)
      "$REAL_GIT" "$@"; status=$?
      touch "$STALL_SWITCH.started"
      sleep 300
      exit $status;;
  esac
fi
exec "$REAL_GIT" "$@"
"""


def comfy_python(venv_dir: Path) -> Path:
    """A throwaway interpreter for ComfyUI (COMFY_PYTHON) that sees the test venv's packages.

    pip installs land in its own site-packages, never in the venv running the tests.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir)], check=True)
    site = next((venv_dir / "lib").glob("python3*/site-packages"))
    outer = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    (site / "outer_venv.pth").write_text(f"import site; site.addsitedir({str(outer)!r})\n")
    return venv_dir / "bin" / "python"


@dataclasses.dataclass
class World:
    """Local stand-ins for the fork, the shared repo, custom nodes, a package index and a model host."""

    base: Path
    server: ModelServer
    comfy_url: str
    shared: Path
    node_urls: dict[str, str]
    python: Path
    bin_dir: Path
    model: bytes

    @property
    def shared_url(self) -> str:
        return f"file://{self.shared}"

    def publish(self, files: dict[str, str]) -> str:
        """Commit new versions of shared-repo files (config_nodes.json, models.yaml, …)."""
        for rel, text in files.items():
            (self.shared / rel).write_text(text)
        git(self.shared, "add", "-A")
        git(self.shared, "commit", "-q", "-m", "update")
        return git(self.shared, "rev-parse", "HEAD")

    def env(self, root: Path, **extra: str) -> dict[str, str]:
        env = clean_env(
            ROOT=str(root), MOCK_GPU="1", NUM_GPUS="1",
            WORKER_BASE_COMFYUI_PORT=str(free_port_block(2)), ORCHESTRATOR_PORT=str(free_port_block(1)),
            COMFY_REPO_URL=self.comfy_url, COMFY_BRANCH="forward", COMFY_FALLBACK_URL=self.comfy_url,
            SHARED_REPO_URL=self.shared_url, SHARED_BRANCH="main", COMFY_PYTHON=str(self.python),
            HF_ENDPOINT=f"http://127.0.0.1:{self.server.port}", CIVITAI_ENDPOINT=f"http://localhost:{self.server.port}",
            PROBE_INTERVAL="0.5", PROBE_TIMEOUT="1", STOP_TIMEOUT="5", GIT_TIMEOUT="60", NODE_TIMEOUT="300",
            PATH=f"{self.bin_dir}:{os.environ['PATH']}", REAL_GIT=str(shutil.which("git")),
            PIP_NO_INDEX="1", PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", GPU_SAMPLE_INTERVAL="1",
        )
        for k in [k for k in env if k.startswith(("PIP_FIND_LINKS", "HF_", "CIVITAI_", "MODELS_"))]:
            if k not in {"HF_ENDPOINT", "CIVITAI_ENDPOINT"}:
                del env[k]
        env.update(extra)
        return env


def build_world(base: Path) -> World:
    from orchestrator.simulator.tree import write_code_tree

    base.mkdir(parents=True, exist_ok=True)
    src = base / "src"
    write_code_tree(src / "ComfyUI")
    make_repo(src / "ComfyUI", {}, branch="forward")
    pkg = src / "slowpkg"
    pkg.mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        '[project]\nname = "orchtest_slowpkg"\nversion = "1.0"\n'
    )
    (pkg / "backend.py").write_text(SLOW_BACKEND)
    urls = {}
    node_files = {
        "alpha-node": {"__init__.py": NODE_INIT},
        "slow-node": {"__init__.py": NODE_INIT, "big.bin": "x" * 200_000},
        "pip-node": {"__init__.py": NODE_INIT, "requirements.txt": f"{pkg}\n"},
        "env-node": {"__init__.py": NODE_INIT},
    }
    for name, files in node_files.items():
        make_repo(src / "nodes" / name, files)
        urls[name] = f"file://{src / 'nodes' / name}"
    bin_dir = base / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(GIT_WRAPPER)
    (bin_dir / "git").chmod(0o755)
    server = ModelServer()
    model = random.Random(7).randbytes(3 * 1024 * 1024)
    server.files["/files/model.safetensors"] = model
    shared = src / "shared"
    make_repo(
        shared,
        {
            "config_nodes.json": json.dumps({"custom_nodes": []}),
            "config_nodes_test.json": json.dumps({"custom_nodes": []}),
            "comfy_dir_config.yaml": SHIPPED_COMFY_DIR_CONFIG.read_text(),
            "static-models.json": json.dumps({"symlinks": [], "no_index": []}),
            "models.yaml": "models: []\n",
            "workflows/.gitkeep": "",
        },
    )
    return World(base, server, f"file://{src / 'ComfyUI'}", shared, urls, comfy_python(base / "comfy-venv"),
                 bin_dir, model)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(tmp_path / "world")
    yield w
    w.server.stop()


# ---------------------------------------------------------------- running and killing the orchestrator
class Orchestrators:
    """Started orchestrator process groups; whatever is left is killed and brought down at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.roots: list[tuple[Path, dict[str, str]]] = []

    def start(self, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
        # Output goes to an unbounded temp file: a full pipe would stall the orchestrator by itself.
        out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by cleanup()
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args], env=env, text=True,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        proc.stdout = out
        self.procs.append(proc)
        self.roots.append((Path(env["ROOT"]), env))
        return proc

    @staticmethod
    def output(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        proc.stdout.seek(0)
        return proc.stdout.read()

    @staticmethod
    def kill(proc: subprocess.Popen[str]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        for root, env in {str(r): (r, e) for r, e in self.roots}.values():
            if Layout(root).socket.exists():
                subprocess.run([sys.executable, "-m", "orchestrator", "down"], env=env, capture_output=True,
                               timeout=120)


@pytest.fixture
def orchestrators() -> Iterator[Orchestrators]:
    o = Orchestrators()
    yield o
    o.cleanup()


def run(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def wait_while_running(predicate: Callable[[], bool], proc: subprocess.Popen[str], timeout: float, what: str) -> None:
    """Wait for ``predicate`` while the orchestrator ``proc`` runs; its output if it ends first."""
    wait_for(lambda: predicate() or proc.poll() is not None, timeout, what=what)
    if not predicate():
        out = Orchestrators.output(proc)
        raise AssertionError(f"the orchestrator ended (exit {proc.returncode}) before {what}:\n{out[-3000:]}")


def holds_a_lock_in(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` holds an flock on a file in ``folder`` (the state dir's lock files),
    read from /proc/locks: taking a lock ourselves to find out could make the orchestrator's own
    non-blocking attempt fail."""
    try:
        inodes = {str(p.stat().st_ino) for p in folder.iterdir() if p.is_file()}
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2a:123456 0 EOF"; a waiter has "->" after the index
        fields = line.split()
        if (len(fields) >= 6 and fields[1] == "FLOCK" and fields[4] == str(pid)
                and fields[5].rsplit(":", 1)[-1] in inodes):
            return True
    return False


# ---------------------------------------------------------------- invariants checked after every kill
def assert_state_parses(root: Path) -> None:
    """Every JSON state file the orchestrator keeps (state dir, download metadata) parses."""
    layout = Layout(root)
    bad = []
    candidates = list(layout.state_dir.rglob("*.json")) if layout.state_dir.exists() else []
    candidates += list((root / "ComfyUI" / "models").rglob(".*.part.json")) if (root / "ComfyUI").exists() else []
    for path in candidates:
        try:
            json.loads(path.read_text())
        except ValueError as exc:
            bad.append(f"{path}: {exc}")
    assert not bad, bad


def assert_no_half_node(root: Path) -> None:
    """Every folder ComfyUI would import from custom_nodes is a complete checkout."""
    custom = Layout(root).custom_nodes_dir
    if not custom.exists():
        return
    for entry in custom.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__" or not entry.is_dir():
            continue  # ComfyUI skips dot folders and *.disabled; clones are staged as .<name>.partial-….disabled
        assert git_worktree.read_head(entry) is not None, f"{entry} is visible to ComfyUI but has no valid HEAD"


def assert_no_partial_model(root: Path, name: str, data: bytes) -> None:
    for path in (root / "ComfyUI" / "models").rglob(name):
        assert path.read_bytes() == data, f"{path} has its final name but not the whole file"


def venv_has(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def monitor_ready(env: dict[str, str]) -> bool:
    return answers(int(env["ORCHESTRATOR_PORT"]), "/readyz")


# ---------------------------------------------------------------- the tests
def test_up_killed_mid_clone_mid_pip_and_mid_download_completes_on_the_next_run(
    world: World, tmp_path: Path, orchestrators: Orchestrators
) -> None:
    root = tmp_path / "root"
    model_sha = hashlib.sha256(world.model).hexdigest()
    world.publish({
        "config_nodes.json": json.dumps({"custom_nodes": [
            {"name": "alpha-node", "url": world.node_urls["alpha-node"]},
            {"name": "slow-node", "url": world.node_urls["slow-node"]},
            {"name": "pip-node", "url": world.node_urls["pip-node"], "requirements": True},
        ]}),
        "models.yaml": (
            f"models:\n  - url: {world.server.url('/files/model.safetensors')}\n"
            f"    dest: checkpoints\n    sha256: {model_sha}\n"
        ),
    })
    env = world.env(root)
    layout = Layout(root)
    custom = layout.custom_nodes_dir
    ckpt = root / "ComfyUI" / "models" / "checkpoints"
    stall_clone = world.base / "stall-clone"
    stall_pip = Path(world.node_urls["pip-node"].removeprefix("file://")).parents[1] / "slowpkg" / "STALL"

    # 1. mid-clone: git has written slow-node's files into its staging folder when we strike.
    stall_clone.touch()
    proc = orchestrators.start({**env, "STALL_CLONE": "slow-node", "STALL_SWITCH": str(stall_clone)}, "up")
    wait_while_running(lambda: Path(f"{stall_clone}.started").exists(), proc, 120, "the clone of slow-node")
    staged = [p for p in custom.iterdir() if p.name.startswith(".slow-node") and ".partial-" in p.name]
    assert staged
    assert (staged[0] / "big.bin").exists()
    orchestrators.kill(proc)
    assert not (custom / "slow-node").exists()
    assert "slow-node" not in nodes_state.load_state(layout)
    assert_no_half_node(root)
    assert_state_parses(root)
    assert not layout.socket.exists()  # killed before supervisord was started
    stall_clone.unlink()

    # 2. mid-pip: the requirements of pip-node are being built when we strike.
    stall_pip.touch()
    proc = orchestrators.start(env, "up")
    wait_while_running(lambda: Path(f"{stall_pip}.started").exists(), proc, 120, "pip building pip-node's requirements")
    orchestrators.kill(proc)
    stall_pip.unlink()
    state = nodes_state.load_state(layout)
    assert git_worktree.read_head(custom / "slow-node") is not None  # the killed clone was redone
    assert state["pip-node"].requirements is None  # the interrupted install is not recorded as done
    assert not venv_has(world.python, "orchtest_slowpkg")
    assert_no_half_node(root)
    assert_state_parses(root)
    assert not [p for p in custom.iterdir() if ".partial-" in p.name]

    # 3. mid-download: a third of the model has arrived when we strike.
    world.server.rate["/files/model.safetensors"] = 400_000
    proc = orchestrators.start(env, "up")

    def part_grew() -> bool:
        parts = list(ckpt.glob(".*.part")) if ckpt.exists() else []
        return bool(parts) and parts[0].stat().st_size > 256 * 1024

    wait_while_running(part_grew, proc, 120, "the model download")
    orchestrators.kill(proc)
    assert not (ckpt / "model.safetensors").exists()  # no partial file under its final name
    assert_no_partial_model(root, "model.safetensors", world.model)
    assert venv_has(world.python, "orchtest_slowpkg")  # pip ran to the end this time
    assert nodes_state.load_state(layout)["pip-node"].requirements not in (None, "off", "absent")
    assert_state_parses(root)
    assert_no_half_node(root)

    # 4. the next `up` completes, resumes the download and starts the instance.
    world.server.rate.clear()
    before = len(world.server.requests)
    r = run(env, "up")
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_until(lambda: monitor_ready(env), 60, 0.2), run(env, "status").stdout
    assert (ckpt / "model.safetensors").read_bytes() == world.model
    assert list(ckpt.glob(".*")) == []  # no part or metadata file left behind
    assert len(world.server.requests) - before == 1  # resumed, not started over nor fetched twice
    assert sorted(p.name for p in custom.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        "alpha-node", "pip-node", "slow-node",
    ]
    for name in ("alpha-node", "slow-node", "pip-node"):
        src = Path(world.node_urls[name].removeprefix("file://"))
        assert git_worktree.read_head(custom / name) == git(src, "rev-parse", "HEAD")
    assert_state_parses(root)
    warm = run(env, "nodes", "sync", "--json")
    assert warm.returncode == 0, warm.stderr
    assert json.loads(warm.stdout)["counts"]["unchanged"] == 3
    assert run(env, "down").returncode == 0


def sync_config(urls: dict[str, str], names: list[str], tag: str) -> str:
    return json.dumps({"custom_nodes": [
        {"name": n, "url": urls[n], "env": {"A": "${HOME}", "B": f"{tag}-{n}"},
         "custom_script": f"sleep 0.3; echo {tag} > done.txt"}
        for n in names
    ]})


def test_random_sigkills_during_nodes_sync_never_leave_a_torn_state_file_or_a_half_node(
    tmp_path: Path, orchestrators: Orchestrators
) -> None:
    src = tmp_path / "src"
    urls = {}
    for i in range(8):
        make_repo(src / f"n{i}", {"__init__.py": NODE_INIT, "data.txt": "d" * 50_000})
        urls[f"n{i}"] = f"file://{src / f'n{i}'}"
    config = tmp_path / "config_nodes.json"
    root = tmp_path / "root"
    env = clean_env(ROOT=str(root), GIT_TIMEOUT="30", NODE_TIMEOUT="60", LOG_LEVEL="warning")
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "11")))
    state_dir = Layout(root).state_dir
    kills = 0
    wanted = 5
    for i in range(3 * wanted):  # a sync that finishes before its kill lands is a round with no kill
        if kills == wanted:
            break
        # Every round asks for different work: installs, removals, new .env values, new scripts.
        config.write_text(sync_config(urls, sorted(rng.sample(sorted(urls), rng.randint(3, 8))), f"round{i}"))
        proc = orchestrators.start(env, "nodes", "sync", "--file", str(config))
        # Strike only once the sync holds its lock (past Python's start-up, into the work), at a
        # random moment of a run whose node scripts alone take 0.3 s each.
        wait_for(lambda p=proc: p.poll() is not None or holds_a_lock_in(p.pid, state_dir), 120, 0.01,
                 "the sync to end or take its lock")
        time.sleep(rng.uniform(0.0, 1.0))  # the random kill point, not a wait for a state
        if proc.poll() is None:
            kills += 1
        orchestrators.kill(proc)
        assert_state_parses(root)
        assert_no_half_node(root)
        for name, rec in nodes_state.load_state(Layout(root)).items():
            # whatever the state says was checked out really is there
            assert git_worktree.read_head(Layout(root).custom_nodes_dir / name) == rec.resolved
    assert kills == wanted, f"only {kills} syncs were still running when killed"
    config.write_text(sync_config(urls, sorted(urls), "final"))
    r = run(env, "nodes", "sync", "--file", str(config), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["failed"] == []
    custom = Layout(root).custom_nodes_dir
    assert sorted(p.name for p in custom.iterdir()) == sorted(urls)
    for name in urls:
        assert (custom / name / "done.txt").read_text() == "final\n"
        assert f"B=final-{name}" in (custom / name / ".env").read_text()
    again = run(env, "nodes", "sync", "--file", str(config), "--json")
    assert json.loads(again.stdout)["counts"]["unchanged"] == len(urls)


# ---------------------------------------------------------------- torn writes are impossible by construction
# Direct writes (not through fsutil.atomic_write/write_json) that are allowed, and why.
ALLOWED_DIRECT_WRITES = {
    ("lifecycle/demo.py", "write_text"): "the demo's own source repositories, outside any state",
    ("provision/models/partfile.py", "open"): "the .part file: partial by design, renamed to its final name only when verified",
    ("provision/git/client.py", "write_text"): "a marker inside a clone being adopted",
    ("machine/fs.py", "fdopen"): "atomic_write itself: temp file, fsync (unless durable=False), rename",
    ("machine/cgroups.py", "write_text"): "cgroup v2 control files (memory.max, cgroup.procs): kernel interfaces, "
    "one write each, never renamed into place",
}


def direct_writes(path: Path) -> list[tuple[str, int]]:
    """Calls in ``path`` that write a file without going through atomic_write."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in {"write_text", "write_bytes"} or (name == "dump" and isinstance(func, ast.Attribute)):
            found.append((name, node.lineno))
        elif name in {"open", "fdopen"}:
            builtin = isinstance(func, ast.Name) or name == "fdopen"
            # open(file, mode) / os.fdopen(fd, mode) / Path.open(mode): the mode argument
            positional = node.args[1:2] if builtin else node.args[0:1]
            modes = positional + [k.value for k in node.keywords if k.arg == "mode"]
            for mode in modes:
                options = [mode.body, mode.orelse] if isinstance(mode, ast.IfExp) else [mode]
                texts = [m.value for m in options if isinstance(m, ast.Constant) and isinstance(m.value, str)]
                if len(texts) < len(options):
                    if builtin:
                        found.append((name, node.lineno))  # a mode we cannot read: count it
                    continue  # x.open(something): a URL opener or a path opened for reading
                if any(set(t) & set("wax+") for t in texts):
                    found.append((name, node.lineno))
    return found


def test_every_state_write_in_the_product_goes_through_atomic_write() -> None:
    unexpected = []
    seen = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("simulator/"):
            continue  # the simulator stands in for ComfyUI; its files are not the product's state
        for name, line in direct_writes(path):
            seen.add((rel, name))
            if (rel, name) not in ALLOWED_DIRECT_WRITES:
                unexpected.append(f"orchestrator/{rel}:{line}: {name}(...)")
    assert ("machine/fs.py", "fdopen") in seen  # the scan does find writes (atomic_write's own)
    assert not unexpected, (
        "files written without fsutil.atomic_write (a kill mid-write tears them): " + "; ".join(unexpected)
    )


def test_atomic_write_killed_at_any_moment_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text(json.dumps({"v": 0}))
    script = (
        "import sys, json\nfrom pathlib import Path\nfrom orchestrator.machine.fs import write_json\n"
        "p = Path(sys.argv[1])\nfor i in range(1, 100000):\n"
        "    write_json(p, {'v': i, 'pad': 'x' * 200000})\n"
    )
    rng = random.Random(5)
    for _ in range(4):
        before = json.loads(target.read_text())["v"]
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)])
        # Strike only once the writer has replaced the file at least once (past Python's start-up)...
        wait_for(lambda v=before: json.loads(target.read_text())["v"] != v, 60, 0.01, "the first write")
        assert proc.poll() is None
        time.sleep(rng.uniform(0.0, 0.5))  # ...at a random moment of its writes (not a wait for a state)
        proc.kill()
        proc.wait()
        data = json.loads(target.read_text())  # never torn
        assert isinstance(data["v"], int)
    assert not [p for p in tmp_path.iterdir() if p.name != "state.json" and not p.name.endswith(".tmp")]
