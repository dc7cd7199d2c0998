"""Import every custom node in a child process the way ComfyUI's loader does, before instances start.

ComfyUI 0.3.x ``nodes.py::load_custom_node``: the module is the folder's ``__init__.py`` (or a
single ``.py`` file) loaded with ``importlib.util.spec_from_file_location`` under the name of its
path with ``.`` replaced by ``_x_``, registered in ``sys.modules`` and executed with the ComfyUI
tree first on ``sys.path`` (and ``comfy/`` after it, as ``nodes.py`` does); it counts as loaded
when it has a ``NODE_CLASS_MAPPINGS`` that is not None (or a callable ``comfy_entrypoint``, the
V3 form). Anything else is a failure, reported by node name with the first line of its error.

One child (``COMFY_PYTHON``, cwd the ComfyUI tree) imports the nodes in order and prints a
line per node as it starts and ends, so a node that kills or hangs the interpreter is named
(``crashed the interpreter`` / ``timed out``) and a new child goes on with the next ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestrator.provision.nodes.deps import CommandRunner

log = logging.getLogger(__name__)

CHILD = r"""
import importlib.util, json, os, sys, traceback
comfy, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, comfy)
sys.path.insert(1, os.path.join(comfy, "comfy"))
def say(**kw):
    sys.stdout.write("@@node " + json.dumps(kw) + "\n")
    sys.stdout.flush()
for path in names:
    say(start=path)
    try:
        if os.path.isfile(path):
            sys_name, init = os.path.splitext(path)[0], path
        else:
            sys_name, init = path.replace(".", "_x_"), os.path.join(path, "__init__.py")
        spec = importlib.util.spec_from_file_location(sys_name, init)
        module = importlib.util.module_from_spec(spec)
        sys.modules[sys_name] = module
        spec.loader.exec_module(module)
        if getattr(module, "NODE_CLASS_MAPPINGS", None) is not None:
            say(done=path, ok=True)
        elif callable(getattr(module, "comfy_entrypoint", None)):
            say(done=path, ok=True)
        else:
            say(done=path, ok=False, error="no NODE_CLASS_MAPPINGS (nor comfy_entrypoint): ComfyUI skips it")
    except BaseException as exc:
        text = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0]
        say(done=path, ok=False, error=text)
"""


def check_imports(
    python: str,
    comfy_dir: Path,
    node_dirs: Sequence[Path],
    runner: CommandRunner,
    environ: Mapping[str, str],
    timeout: float,
) -> dict[str, str]:
    """Import each node folder in a child process; node name -> first line of its error (failed only)."""
    failed: dict[str, str] = {}
    remaining = [str(p) for p in node_dirs]
    while remaining:
        result = runner(
            [python, "-c", CHILD, str(comfy_dir), *remaining],
            cwd=comfy_dir if comfy_dir.is_dir() else None,
            env=environ,
            timeout=timeout,
        )
        finished: set[str] = set()
        current: str | None = None
        for line in result.output.splitlines():
            if not line.startswith("@@node "):
                continue
            try:
                event = json.loads(line[len("@@node ") :])
            except ValueError:
                continue
            if "start" in event:
                current = str(event["start"])
            elif "done" in event:
                finished.add(str(event["done"]))
                current = None
                if not event.get("ok"):
                    failed[Path(str(event["done"])).name] = str(event.get("error") or "import failed")
        if current is None:
            unfinished = [p for p in remaining if p not in finished]
            if unfinished:  # the interpreter never got to them (it did not start at all)
                why = result.tail(1)
                for p in unfinished:
                    failed[Path(p).name] = f"the import check could not run: {why}"
            break
        if result.timed_out:
            failed[Path(current).name] = f"import timed out after {timeout:g}s"
        else:
            failed[Path(current).name] = f"import crashed the interpreter (exit {result.returncode})"
        remaining = remaining[remaining.index(current) + 1 :]
    for name, error in sorted(failed.items()):
        log.error("node %s: import failed: %s", name, error)
    return failed
