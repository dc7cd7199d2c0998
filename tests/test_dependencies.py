"""Every third-party import of the package is declared in setup.cfg, with a floor that CI tests.

.ci/run installs the package with ``-c constraints/floors.txt`` (every direct dependency pinned
to its floor) into a second venv and runs the unit tests there, so the floors below are tested.
"""

from __future__ import annotations

import ast
import configparser
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "orchestrator"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(line: str) -> tuple[str, str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|==)\s*([0-9][0-9A-Za-z.]*)\s*$", line)
    assert match, f"expected NAME>=FLOOR (or NAME==VERSION): {line!r}"
    return canonical(match[1]), match[2], match[3]


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def install_requires() -> dict[str, str]:
    lines = [x for x in setup_cfg()["options"]["install_requires"].splitlines() if x.strip()]
    out = {}
    for line in lines:
        name, op, version = requirement(line)
        assert op == ">=", f"install_requires needs a floor (>=): {line!r}"
        out[name] = version
    return out


def extras() -> set[str]:
    names = set()
    for value in setup_cfg()["options.extras_require"].values():
        for line in value.splitlines():
            if line.strip():
                names.add(canonical(re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0]))
    return names


def third_party_imports() -> dict[str, str]:
    """Top-level module → the first file importing it (absolute imports, stdlib and our own left out)."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in {"orchestrator", "__future__"}:
                    continue
                found.setdefault(top, str(path.relative_to(REPO)))
    return found


@functools.cache
def installed() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def distribution(module: str) -> str:
    dists = installed().get(module)
    return canonical(dists[0]) if dists else canonical(module)  # not installed: an optional extra


def test_every_third_party_import_is_a_declared_dependency() -> None:
    declared = set(install_requires()) | extras()
    missing = {
        f"{module} ({distribution(module)}, imported in {where})"
        for module, where in third_party_imports().items()
        if distribution(module) not in declared
    }
    assert not missing, f"imported but not declared in setup.cfg: {sorted(missing)}"


def test_the_scan_sees_the_imports_that_were_once_missed() -> None:
    imports = third_party_imports()
    assert {"pydantic", "urllib3", "prometheus_client", "yaml", "pynvml", "supervisor"} <= set(imports)


def test_every_floor_is_pinned_in_the_constraints_that_ci_tests() -> None:
    pins = {}
    for line in (REPO / "constraints" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, op, version = requirement(line)
            assert op == "==", f"constraints/floors.txt pins exact versions: {line!r}"
            pins[name] = version
    runtime = {name: version for name, version in pins.items() if name in install_requires()}
    assert runtime == install_requires(), "setup.cfg floors and constraints/floors.txt differ"
    # Besides the runtime floors, only test tools that the floors themselves need may be pinned
    # (FastAPI 0.110's TestClient passes `app=` to httpx, which httpx 0.28 removed).
    assert set(pins) - set(runtime) <= extras(), "constraints/floors.txt pins a package setup.cfg does not declare"


def test_ci_runs_the_unit_tests_against_the_floors() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "-c constraints/floors.txt" in ci
    assert ".venv-floors/bin/python -m pytest" in ci
