"""The import contract between the subpackages (docs/ARCHITECTURE.md draws it).

Every ``import``/``from ... import`` of an ``orchestrator`` module, at any depth in a function or
at the top, is checked against the allowed direction; ``core`` may not reach for effects at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"

# package -> the orchestrator packages it may import (besides itself). Layers, bottom first.
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "machine": frozenset({"core"}),
    "comfy": frozenset({"core"}),
    "provision": frozenset({"core", "machine"}),
    "jobs": frozenset({"core", "machine", "comfy"}),
    "monitor": frozenset({"core", "machine", "comfy", "provision", "jobs"}),
    "simulator": frozenset({"core", "machine"}),
    "lifecycle": frozenset({"core", "machine", "comfy", "provision", "monitor", "jobs", "simulator"}),
    "cli": frozenset({"core", "machine", "comfy", "provision", "monitor", "jobs", "lifecycle", "simulator", "fleet"}),
    "fleet": frozenset({"core", "machine", "jobs"}),
}
# What `core` (pure values and decisions) may not import: anything that reaches the OS or network.
EFFECTFUL = frozenset({
    "subprocess", "socket", "signal", "requests", "aiohttp", "httpx", "psutil", "pynvml", "supervisor",
    "urllib.request", "http.client", "xmlrpc.client", "fcntl", "shutil", "uvicorn", "git",
})


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "orchestrator":
                found += [(node.lineno, f"orchestrator.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if _package_of(p))


def test_every_subpackage_is_in_the_contract_and_says_what_it_owns() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages - {"schemas"} == set(ALLOWED)
    for name in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc, f"orchestrator/{name}/__init__.py needs a docstring: what it owns, what it may import"
        assert "import" in doc, f"orchestrator/{name}/__init__.py: say what the package may import"


def test_subpackages_import_only_downwards() -> None:
    wrong = []
    for path in _modules():
        pkg = _package_of(path)
        if pkg not in ALLOWED:
            continue
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "orchestrator" or len(parts) < 2:
                continue
            target = parts[1]
            if target in {pkg, "__version__"} or target in ALLOWED[pkg]:
                continue
            wrong.append(f"orchestrator/{path.relative_to(PACKAGE)}:{line}: {pkg} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_core_has_no_effects() -> None:
    wrong = []
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        for line, name in _imports(path):
            if name in EFFECTFUL or name.split(".")[0] in EFFECTFUL:
                wrong.append(f"orchestrator/core/{path.name}:{line}: imports {name}")
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_prints() -> None:
    wrong = []
    for path in _modules():
        pkg = _package_of(path)
        if pkg == "cli" or path.relative_to(PACKAGE).as_posix() in {"simulator/server.py", "simulator/cli_args.py"}:
            continue  # the simulator's own entry point prints like ComfyUI does
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                wrong.append(f"orchestrator/{path.relative_to(PACKAGE)}:{node.lineno}: print(...)")
    assert not wrong, "\n".join(wrong)


def test_the_cli_imports_its_commands_directly() -> None:
    for path in sorted((PACKAGE / "cli").rglob("*.py")):
        assert "importlib" not in {name.split(".")[0] for _, name in _imports(path)}, path


@pytest.mark.parametrize("limit", [400])
def test_no_module_over_the_limit_without_a_reason(limit: int) -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > limit and "Longer than" not in doc:
            long.append(f"orchestrator/{path.relative_to(PACKAGE)}: {lines} lines")
    assert not long, "modules over ~400 lines need a 'Longer than 400 lines because ...' docstring line:\n" + "\n".join(long)


def test_no_class_over_200_lines_without_a_reason() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno and node.end_lineno - node.lineno > 200:
                doc = ast.get_docstring(node) or ""
                if "Longer than" not in doc:
                    long.append(f"orchestrator/{path.relative_to(PACKAGE)}:{node.lineno}: class {node.name}")
    assert not long, "classes over ~200 lines need a 'Longer than 200 lines because ...' docstring line:\n" + "\n".join(long)


def test_the_architecture_doc_draws_the_same_contract() -> None:
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    drawn: dict[str, frozenset[str]] = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`") and cells[0].strip("`") in ALLOWED:
            name = cells[0].strip("`")
            mentioned = {w.strip("`,()") for w in cells[1].split()}
            # "all of the above" / "everything": the top two layers may import every package below
            drawn[name] = ALLOWED[name] if name in {"lifecycle", "cli"} else frozenset(mentioned & set(ALLOWED))
    assert set(drawn) == set(ALLOWED)
    for name, imports in drawn.items():
        assert imports == ALLOWED[name], name
