"""The architecture, checked: each module imports only from its own layer or the layers below, and
no import crosses one of the three boundaries (DESIGN.md), even within a layer.

The layers, top to bottom: interface > supervisor > processes > transport > OS edges > logging >
model > core. A package stands for every module in it unless a module is placed on its own.

The boundaries:

- process: the worker's side (``procd.worker``) and the supervisor's side (``procd.supervisor``,
  ``procd.ops``, ``procd.launch``) never import each other, except that ``launch`` starts a worker
  (``procd.worker`` itself, and the ``worker.reporter`` a failed exec reports through). What both
  sides share is declared once in modules of neither: ``context``, ``reports``, ``callables``,
  ``transport``.
- transport: outside ``procd.transport`` only its interface, the slot file's header and the
  dead-letter files are imported, never a backend; a backend imports no other backend except the
  ``local`` socket machinery that ``sqlite`` builds on.
- operations: ``procd.ops`` is composed by the supervisor and never reaches into it; the one thing
  it reads is the supervisor's view of a worker slot (``supervisor.slots``), which it shows.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "procd"

LAYERS = {
    "interface": {"cli", "__main__"},
    "supervisor": {"supervisor", "ops"},
    "processes": {"worker", "launch", "context", "callables"},
    "transport": {"transport"},
    "os": {"signals", "reaper", "procctl", "procinfo"},
    "logging": {"log", "events"},
    "model": {"config", "plan"},
    "core": {"lifecycle", "errors", "frozen", "deferred", "restarts", "reports", "throttle", "__init__"},
}
ORDER = ["core", "model", "logging", "os", "transport", "processes", "supervisor", "interface"]
PLACE = {entry: ORDER.index(layer) for layer, entries in LAYERS.items() for entry in entries}

# Each backend, as the modules it is made of.
BACKENDS = {
    "local": {"transport.local"},
    "sqlite": {"transport.sqlite"},
    "redis": {"transport.streams", "transport.redisstream"},
}
BACKEND_MODULES = set().union(*BACKENDS.values())
# (importer, imported, allowed): a module under ``importer`` imports nothing under ``imported``
# except the modules in ``allowed``.
BOUNDARIES = [
    ("worker", "launch", set()),
    ("worker", "supervisor", set()),
    ("worker", "ops", set()),
    ("supervisor", "worker", set()),
    ("ops", "worker", set()),
    ("launch", "worker", {"worker", "worker.reporter"}),
    ("ops", "supervisor", {"supervisor.slots"}),
]


def _modules() -> dict[Path, str]:
    """Every module of the package, by its dotted name under ``procd`` (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        found[path] = ".".join(parts)
    return found


MODULES = set(_modules().values())


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer(name: str) -> int:
    """The layer of a module: its own entry, else its package's."""
    while name not in PLACE:
        assert "." in name, f"{name} has no layer"
        name = name.rsplit(".", 1)[0]
    return PLACE[name]


def _procd_imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and _within(node.module, "procd"):
            module = node.module.removeprefix("procd").removeprefix(".")
            for alias in node.names:
                inner = f"{module}.{alias.name}" if module else alias.name
                found.add(inner if inner in MODULES else module or "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("procd.") for a in node.names if a.name.startswith("procd.")}
    return found


def test_every_module_has_a_layer_and_a_docstring() -> None:
    for path, name in _modules().items():
        _layer(name)
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"
    assert {entry for entry in PLACE if not any(_within(m, entry) for m in MODULES)} == set()


def test_imports_flow_downward() -> None:
    wrong = []
    for path, name in sorted(_modules().items()):
        for imported in _procd_imports(path):
            if _layer(imported) > _layer(name):
                wrong.append(f"{name} ({ORDER[_layer(name)]}) imports {imported} ({ORDER[_layer(imported)]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_crosses_a_boundary() -> None:
    wrong = []
    for path, name in sorted(_modules().items()):
        for imported in _procd_imports(path):
            for importer, target, allowed in BOUNDARIES:
                if _within(name, importer) and _within(imported, target) and imported not in allowed:
                    wrong.append(f"{name} imports {imported}: {importer} never reaches into {target}")
            if imported in BACKEND_MODULES and not _within(name, "transport"):
                wrong.append(f"{name} imports the backend {imported}: only the transport interface is for outside")
            for modules in BACKENDS.values():
                others = BACKEND_MODULES - modules - BACKENDS["local"]
                if name in modules and imported in others:
                    wrong.append(f"backend module {name} imports {imported}, another backend's")
    assert not wrong, "\n".join(wrong)


def test_the_boundaries_are_checked_against_real_modules() -> None:
    """A boundary that names no module would pass for ever."""
    for importer, target, allowed in BOUNDARIES:
        assert any(_within(m, importer) for m in MODULES), importer
        assert any(_within(m, target) for m in MODULES), target
        assert allowed <= MODULES, allowed - MODULES
    assert BACKEND_MODULES <= MODULES


def test_no_two_classes_share_a_name() -> None:
    """One name, one thing: a reader never has to ask which ``Slot`` is meant."""
    seen: dict[str, str] = {}
    twice = []
    for path, name in sorted(_modules().items()):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                if node.name in seen:
                    twice.append(f"{node.name} in {seen[node.name]} and {name}")
                seen[node.name] = name
    assert not twice, "\n".join(twice)


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
    paths = [
        *(PACKAGE / "supervisor").rglob("*.py"),
        *(PACKAGE / "ops").rglob("*.py"),
        PACKAGE / "transport" / "slot.py",
    ]
    assert len(paths) > 5
    for path in paths:
        assert not _uses_pickle(path), path.name


def test_only_the_reaper_calls_waitpid() -> None:
    callers = [p.name for p in PACKAGE.rglob("*.py") if "os.waitpid(" in p.read_text()]
    assert callers == ["reaper.py"]
