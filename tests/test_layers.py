"""The architecture, checked: each module imports only from its own layer or the layers below.

The layers (DESIGN.md): interface > loop > processes > OS edges > logging > model > core.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "procd"

LAYERS = {
    "interface": {"cli", "__main__", "top"},
    "loop": {"supervisor", "control", "status", "loop"},
    "processes": {"worker", "spawn", "child", "channels", "forkserver", "environment"},
    "os": {
        "signals",
        "reaper",
        "queues",
        "procctl",
        "callables",
        "procinfo",
        "inflight",
        "deadletters",
        "durable",
        "notify",
        "metrics",
        "connections",
    },
    "logging": {"log", "events"},
    "model": {"config", "plan", "starter"},
    "core": {"lifecycle", "errors", "restarts", "reports", "throttle", "__init__"},
}
ORDER = ["core", "model", "logging", "os", "processes", "loop", "interface"]
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


def test_every_module_has_a_layer_and_a_docstring() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(RANK), f"unplaced: {modules - set(RANK)}, missing: {set(RANK) - modules}"
    for path in PACKAGE.glob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"


def test_imports_flow_downward() -> None:
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        for imported in _procd_imports(path):
            if RANK[imported] > RANK[path.stem]:
                wrong.append(f"{path.stem} ({ORDER[RANK[path.stem]]}) imports {imported} ({ORDER[RANK[imported]]})")
    assert not wrong, "\n".join(wrong)


def test_only_the_reaper_calls_waitpid() -> None:
    callers = [p.name for p in PACKAGE.glob("*.py") if "os.waitpid(" in p.read_text()]
    assert callers == ["reaper.py"]
