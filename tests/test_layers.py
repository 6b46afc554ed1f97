"""The architecture, checked: each module imports only from its own layer or the layers below.

The layers (DESIGN.md): interface > loop > processes > transport > OS edges > logging > model >
core. The ``transport`` package is one entry: its modules (the interface and one per backend)
share its layer and may import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "procd"

LAYERS = {
    "interface": {"cli", "__main__", "top"},
    "loop": {"supervisor", "control", "status", "loop"},
    "processes": {"worker", "spawn", "child", "forkserver", "environment", "reloadcheck"},
    "transport": {"transport"},
    "os": {
        "signals",
        "reaper",
        "procctl",
        "callables",
        "procinfo",
        "deadletters",
        "notify",
        "metrics",
        "connections",
    },
    "logging": {"log", "events"},
    "model": {"config", "plan", "starter"},
    "core": {"lifecycle", "errors", "frozen", "restarts", "reports", "throttle", "__init__"},
}
ORDER = ["core", "model", "logging", "os", "transport", "processes", "loop", "interface"]
RANK = {module: ORDER.index(layer) for layer, modules in LAYERS.items() for module in modules}


def _procd_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("procd"):
            if node.module == "procd":
                found |= {alias.name for alias in node.names if alias.name in RANK}
                if any(alias.name == "__version__" for alias in node.names):
                    found.add("__init__")
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("procd.")}
    return found


def _modules() -> dict[Path, str]:
    """Every module of the package, as the name its layer is looked up by."""
    found = {path: path.stem for path in PACKAGE.glob("*.py")}
    found |= {path: "transport" for path in (PACKAGE / "transport").glob("*.py")}
    return found


def test_every_module_has_a_layer_and_a_docstring() -> None:
    modules = set(_modules().values())
    assert modules == set(RANK), f"unplaced: {modules - set(RANK)}, missing: {set(RANK) - modules}"
    for path in _modules():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"


def test_imports_flow_downward() -> None:
    wrong = []
    for path, name in sorted(_modules().items()):
        for imported in _procd_imports(path):
            if RANK[imported] > RANK[name]:
                wrong.append(f"{path.name} ({ORDER[RANK[name]]}) imports {imported} ({ORDER[RANK[imported]]})")
    assert not wrong, "\n".join(wrong)


def _uses_pickle(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name == "pickle" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "pickle":
            return True
        if isinstance(node, ast.Name) and node.id == "pickle":
            return True
    return False


def test_the_supervisor_never_unpickles() -> None:
    """What the supervisor knows of a held batch comes from the slot file's header (numbers);
    only the worker side of a backend unpickles."""
    for path in (
        PACKAGE / "supervisor.py",
        PACKAGE / "status.py",
        PACKAGE / "worker.py",
        PACKAGE / "transport" / "slot.py",
    ):
        assert not _uses_pickle(path), path.name


def test_only_the_reaper_calls_waitpid() -> None:
    callers = [p.name for p in PACKAGE.rglob("*.py") if "os.waitpid(" in p.read_text()]
    assert callers == ["reaper.py"]
