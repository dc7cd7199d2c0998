"""The ComfyUI API simulator: an aiohttp server started exactly as ComfyUI is (``python main.py``).

It serves ComfyUI's HTTP and WebSocket API (COMFYUI_API.md); with ``SIM_PROTOCOL=fork`` its
/ws behaves as the fleet fork's does (own client ids, ping, prompt messages, node_executing).
It writes real PNGs to the output folder, and can be told to start slowly, crash, hang or
print CUDA out-of-memory errors (see ``faults.py``). It stands in for ComfyUI in tests and
in ``orchestrator demo`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from aiohttp import web

from orchestrator.simulator import cli_args, startup
from orchestrator.simulator import faults as faultlib
from orchestrator.simulator import folders as fp
from orchestrator.simulator.app import build_app
from orchestrator.simulator.instance import Simulator
from orchestrator.simulator.nodes import catalogue

PROTOCOLS = ("upstream", "fork")  # SIM_PROTOCOL: whose /ws dialect to speak (COMFYUI_API.md)


class Console:
    """ComfyUI's console: bare messages, one line each, flushed at once."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, message: str) -> None:
        try:
            self.stream.write(message + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed: keep serving


class Stopper:
    """SIGTERM/SIGINT land here. A plain ``signal.signal`` handler still runs while the loop is hung."""

    def __init__(self) -> None:
        self.requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._loop, self._event = loop, event
        if self.requested:
            event.set()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self._loop is not None and self._event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._event.set)


class StartupFailure(Exception):
    """Initialisation failed; ``exc_line`` is the last line of the traceback ComfyUI would print."""

    def __init__(self, exc_line: str) -> None:
        super().__init__(exc_line)
        self.exc_line = exc_line


def load_extra_paths(configs: Sequence[str], comfy_dir: Path, log: Console) -> list[fp.SearchPath]:
    """Every --extra-model-paths-config file (plus the tree's own extra_model_paths.yaml), logged.

    A missing file is a warning (ComfyUI itself would die on it).

    Raises:
        StartupFailure: a file is not valid YAML, or PyYAML is missing (ComfyUI dies too).
    """
    try:
        import yaml
    except ImportError:
        raise StartupFailure("ModuleNotFoundError: No module named 'yaml'") from None

    own = comfy_dir / "extra_model_paths.yaml"
    out: list[fp.SearchPath] = []
    for path in [*([str(own)] if own.is_file() else []), *configs]:
        try:
            with open(path, encoding="utf-8") as fh:
                config = yaml.safe_load(fh)
        except OSError as exc:
            log(f"WARNING: cannot read extra model paths config {path}: {exc.strerror}")
            continue
        except yaml.YAMLError as exc:
            raise StartupFailure(f"{type(exc).__module__}.{type(exc).__name__}: {exc}") from None
        for entry in fp.extra_search_paths(config, Path(os.path.abspath(path)).parent):
            log(f"Adding extra search path {entry.key} {entry.path}")
            out.append(entry)
    return out


def _remove_temp(temp: Path) -> None:
    shutil.rmtree(temp, ignore_errors=True)


async def _serve(sim: Simulator, stopper: Stopper, addresses: list[str], port: int) -> int:
    """Bind, serve until stopped; the exit code."""
    loop = asyncio.get_running_loop()
    stopper.attach(loop, sim.stop)
    delay = sim.faults.start_delay
    if delay > 0:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(sim.stop.wait(), timeout=delay)
    if sim.stop.is_set():
        _remove_temp(sim.folders.temp)
        return 0
    if sim.args.quick_test_for_ci:
        _remove_temp(sim.folders.temp)
        return 0
    runner = web.AppRunner(build_app(sim), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    sim.log("Starting server\n")
    try:
        for address in addresses:
            await web.TCPSite(runner, address, port).start()
            shown = f"[{address}]" if ":" in address else address
            sim.log(f"To see the GUI go to: http://{shown}:{port}")
    except OSError:
        sim.log(traceback.format_exc().rstrip())
        await runner.cleanup()
        return 1
    sim.start_tasks()
    await sim.stop.wait()
    for task in sim.tasks:
        task.cancel()
    await sim.hub.close_all()
    await runner.cleanup()
    _remove_temp(sim.folders.temp)
    sim.log("\nStopped server")
    return 0


def run(
    comfy_dir: str | os.PathLike[str] | None = None,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    stream: IO[str] | None = None,
) -> int:
    """Start the simulator as ``python main.py <argv>`` would; returns the exit code.

    Args:
        comfy_dir: the code tree (main.py's folder); default the current directory.
        argv: flags (default ``sys.argv[1:]``). Bad flags exit 2, as argparse does.
        env: environment for faults (default ``os.environ``).
        stream: where the log goes (default stdout).
    """
    args = cli_args.parse_args(argv)
    environ = os.environ if env is None else env
    log = Console(stream)
    root = Path(os.path.abspath(comfy_dir or os.getcwd()))
    stopper = Stopper()
    env_faults, warnings = faultlib.from_env(environ)
    for w in warnings:
        log(w)
    # Install both handlers unconditionally: a parent that ignored SIGINT (a background job of a
    # non-interactive shell, ``make test </dev/null &``) passes SIG_IGN on through exec, and
    # Python would then leave SIGINT ignored, so only SIGKILL could stop an ignore_sigterm run.
    signal.signal(signal.SIGINT, stopper)
    # ComfyUI installs no SIGTERM handler: the default action ends it at once (exit -15, temp folder
    # left behind), hung or not. Only SIGINT is a graceful stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN if env_faults.ignore_sigterm else signal.SIG_DFL)

    try:
        extra = load_extra_paths(list(itertools.chain(*(args.extra_model_paths_config or []))), root, log)
    except StartupFailure as exc:
        log(startup.crash_text(root, exc.exc_line))
        return 1
    folders = fp.resolve(args, root, extra)
    if args.output_directory:
        log(f"Setting output directory to: {folders.output}")
    if args.input_directory:
        log(f"Setting input directory to: {folders.input}")
    if args.user_directory:
        log(f"Setting user directory to: {folders.user}")
    if args.temp_directory:
        log(f"Setting temp directory to: {folders.temp}")
    _remove_temp(folders.temp)
    for d in (folders.output, folders.input, folders.temp, folders.user):
        d.mkdir(parents=True, exist_ok=True)

    file_values, warnings = faultlib.read_file(folders.user / faultlib.FAULTS_FILE)
    faults, more = faultlib.overlay(env_faults, file_values, str(folders.user / faultlib.FAULTS_FILE))
    for w in warnings + more:
        log(w)
    if faults.ignore_sigterm and not env_faults.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    if not args.cpu:
        if args.cuda_device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.cuda_device)
            log(f"Set cuda device to: {args.cuda_device}")
        visible = environ.get("CUDA_VISIBLE_DEVICES") if args.cuda_device is None else str(args.cuda_device)
        if visible is not None and visible.strip() in ("", "-1"):
            log(startup.crash_text(root, "RuntimeError: No CUDA GPUs are available"))
            return 1
    ram_total, _ = startup.memory_bytes()
    state = startup.vram_state(args.cpu, args.lowvram, args.novram, args.highvram, args.gpu_only)
    for line in startup.device_lines(args.cpu, faults.gpu_name, faults.gpu_vram, ram_total, state):
        log(line)
    version = startup.comfyui_version(root)
    log(f"Python version: {sys.version}")
    log(f"ComfyUI version: {version}")
    log(f"ComfyUI frontend version: {startup.FRONTEND_VERSION}")
    log(f"[Prompt Server] web root: {Path(sys.prefix) / 'comfyui_frontend_package' / 'static'}")
    if folders.database is not None:
        try:
            folders.database.touch()
        except OSError as exc:
            log(
                "Failed to initialize database. Please ensure you have installed the latest requirements. "
                "If the error persists, please report this as in future the database will be required: "
                f"(sqlite3.OperationalError) unable to open database file ({exc.strerror})"
            )

    extra_nodes = [n for n in environ.get("SIM_EXTRA_NODES", "").split(",") if n.strip()]
    results, skipped = startup.scan_custom_nodes(
        folders.custom_node_dirs(),
        root,
        faults.import_failed,
        args.disable_all_custom_nodes,
        args.whitelist_custom_nodes,
    )
    for line in skipped:
        log(line)
    for r in results:
        for line in r.log:
            log(line)
    for line in startup.import_times(results):
        log(line)
    extra_nodes += [name for r in results if r.ok for name in r.classes]

    protocol = environ.get("SIM_PROTOCOL", "").strip().lower() or "upstream"
    if protocol not in PROTOCOLS:
        log(f"simulator: ignoring SIM_PROTOCOL={protocol!r} (expected one of {', '.join(PROTOCOLS)}); using upstream")
        protocol = "upstream"
    sim = Simulator(args, folders, env_faults, catalogue(extra_nodes), log, stopper, version, protocol)
    sim.watch.faults = faults
    addresses = [a.strip() for a in str(args.listen).split(",") if a.strip()]
    return asyncio.run(_serve(sim, stopper, addresses, args.port))


def main(comfy_dir: str | os.PathLike[str] | None = None) -> None:
    """Entry point of the tree's ``main.py`` and of ``python -m orchestrator.simulator``."""
    sys.exit(run(comfy_dir))
