"""The pipeline's own virtual environment: its projects built with PEP 517, installed, reused.

``[pipeline] packages`` names project directories (each with a ``pyproject.toml``) and
``requirements`` more distributions. procd is the build frontend: for each project it makes an
isolated build environment, installs the ``[build-system] requires`` there, asks the project's
backend (through ``pyproject_hooks.BuildBackendHookCaller``, honouring ``backend-path``) for more
(``get_requires_for_build_wheel``), installs those, and has the backend build a wheel. The wheels
and the requirements are then installed into a fresh virtual environment under the state
directory, ``STATE_DIR/envs/KEY``, whose interpreter runs the function-stage workers.

``KEY`` is a hash of everything the environment is made of: each project's source files, the
requirements, procd's version and requirements, and the Python version. A start whose key names
a complete environment reuses it and builds nothing; a change of any of those makes a new one.

Discussion.

- *Installing.* pip does the installing (``pip --python ENV install``), run from procd's own
  interpreter, so the environments themselves carry no pip (a virtual environment without pip is
  made in 40 ms, with it in seconds). Where pip looks is pip's own configuration: ``PIP_INDEX_URL``,
  ``PIP_FIND_LINKS``, ``PIP_NO_INDEX`` and pip.conf apply as they would to ``pip install``.
- *procd inside.* A worker runs procd's worker code in the environment's interpreter. The
  environment gets a directory of links to procd's package and to the distributions procd
  requires (structlog, setproctitle, ...), listed by a ``.pth`` file: ``.pth`` entries come after
  site-packages, so the user's own distributions always win, and nothing else of procd's
  interpreter is visible to stage code.
- *In use, then removed.* Every environment has a lock file beside it. A process that runs
  workers in it holds a shared ``flock`` on it for as long as it does; a builder holds it
  exclusively while it builds. After a build, every other environment whose lock can be had
  exclusively (nothing runs in it) is removed. Builds write into the source tree as pip's do
  (setuptools leaves ``build/`` and ``*.egg-info``); those are left out of the hash, and so are
  the state directory and any virtual environment inside a project.
- *Time.* A build takes seconds and runs in the caller: ``procd run`` before it starts anything,
  and the supervisor's reload, whose loop waits meanwhile (each step ticks about once a second,
  so the supervisor keeps systemd's watchdog fed). ``procd build`` before ``procd reload`` leaves
  the reload only a hash of the sources to make.
- *The import check* runs in the environment's interpreter, a fresh process that costs a start;
  ``procd run`` skips it when the same stage functions passed it before in the same environment
  and all come from the environment, whose code cannot change without a new key.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from procd import __version__, callables, config
from procd.config import PipelineSpec
from procd.errors import Problem

ENVS_DIR = "envs"
_COMPLETE = "procd-environment.json"  # written last: its presence means the environment is whole
_RUNTIME_DIR = "procd-runtime"
_SCRATCH = ".build"  # beside an environment being built: its build environments and wheels
_LAYOUT = 2  # what an environment holds besides the user's distributions; a change makes new ones
# What a worker imports from outside the standard library when procd is not an installed
# distribution (a bare source tree on PYTHONPATH): procd and its dependencies' modules.
_RUNTIME_FALLBACK = ("procd", "setproctitle", "structlog")
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})
_SKIPPED_TOP = frozenset({"build", "dist"})  # a build's output, at a project's top only
_TAIL_LINES = 25
# PEP 517: a project without [build-system] is built as setuptools' legacy backend would.
_DEFAULT_REQUIRES = ("setuptools>=40.8.0",)
_DEFAULT_BACKEND = "setuptools.build_meta:__legacy__"
_TICK_S = 1.0  # while a step runs, the caller's tick is called this often (the watchdog)
_TIMED_OUT = -1  # the exit code _Steps.run reports for a program it killed at its deadline


class BuildError(Exception):
    """A project could not be built or the environment could not be made.

    The message names the project and what failed; ``tail`` holds the last lines of the output
    of the backend (or of pip) that failed.
    """

    def __init__(self, project: str, what: str, output: str) -> None:
        self.project = project
        self.what = what
        lines = output.rstrip().splitlines()
        self.tail = "\n".join(lines[-_TAIL_LINES:])
        super().__init__(f"cannot build {project}: {what}")


@dataclass(frozen=True)
class Built:
    """One project, built into a wheel."""

    project: str  # its directory
    backend: str
    wheel: str  # the wheel's file name


@dataclass
class Environment:
    """A complete environment, and this process's shared lock on it while in use."""

    path: str
    key: str
    built: bool  # True if this call built it; False if it was reused
    seconds: float  # how long preparing it took
    projects: tuple[Built, ...] = ()
    lock_fd: int | None = field(default=None, repr=False)

    @property
    def python(self) -> str:
        """The environment's interpreter: what function-stage workers run in."""
        return os.path.join(self.path, "bin", "python")

    def release(self) -> None:
        """Drop this process's claim on the environment (it may then be removed)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def environment_key(spec: PipelineSpec) -> str:
    """A hash of what the environment is made of; equal keys mean an equal environment.

    Raises:
        OSError: a project's files cannot be read.
    """
    digest = hashlib.sha256()

    def add(*parts: str | bytes) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            digest.update(len(data).to_bytes(8, "little") + data)

    add("procd", __version__, str(_LAYOUT), sys.implementation.cache_tag or "", sys.version)
    add("procd requires", *_procd_requires())  # what _link_runtime links into the environment
    for requirement in spec.requirements:
        add("requirement", requirement)
    for project in spec.packages:
        add("project", project)
        for relative in _source_files(project, skip=spec.state_dir):
            with open(os.path.join(project, relative), "rb") as fh:
                add(relative, hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()[:16]


def _procd_requires() -> list[str]:
    """procd's declared requirements, from its installed metadata (none when it runs from a bare
    source tree). Read directly: importing ``importlib.metadata`` would cost every start ~10 ms."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith("procd-") and name.endswith(".dist-info"):
                try:
                    with open(os.path.join(entry, name, "METADATA"), encoding="utf-8") as fh:
                        lines = fh.read().partition("\n\n")[0].splitlines()
                except OSError:
                    continue
                return sorted(line.partition(":")[2].strip() for line in lines if line.startswith("Requires-Dist:"))
    return []


def _source_files(project: str, *, skip: str) -> list[str]:
    """A project's files, relative and sorted, without what builds and tools leave there, the
    directory ``skip`` (the state directory, which holds the environments) and virtual
    environments."""
    found = []
    for root, dirs, files in os.walk(project):
        top = root == project
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in _SKIPPED_DIRS
            and not d.endswith(".egg-info")
            and not (top and d in _SKIPPED_TOP)
            and os.path.join(root, d) != skip
            and not os.path.exists(os.path.join(root, d, "pyvenv.cfg"))
        ]
        for name in files:
            if not name.endswith((".pyc", ".pyo")):
                found.append(os.path.relpath(os.path.join(root, name), project))
    return sorted(found)


def envs_dir(spec: PipelineSpec) -> str:
    """Where a pipeline's environments live."""
    return os.path.join(spec.state_dir, ENVS_DIR)


def prepare(
    spec: PipelineSpec, *, progress: Callable[[str], None] | None = None, tick: Callable[[], None] | None = None
) -> Environment:
    """Return the pipeline's environment, built if there is none for its current key, and hold a
    shared lock on it (``Environment.release`` drops it). Other environments that nothing runs in
    are removed after a build.

    Args:
        spec: a pipeline with ``packages`` or ``requirements``.
        progress: called with one line of text per step (``procd build`` prints them).
        tick: called about every second while a step runs (the supervisor pings its watchdog:
            a reload that builds must not look like a hung procd to systemd).

    Raises:
        BuildError: a project cannot be built, or an install fails; nothing is left half made.
    """
    started = time.monotonic()
    directory = envs_dir(spec)
    try:
        os.makedirs(directory, exist_ok=True)
        key = environment_key(spec)
    except OSError as exc:
        raise BuildError(spec.name, f"cannot read or write {exc.filename}: {exc.strerror}", "") from None
    path = os.path.join(directory, key)
    steps = _Steps(progress or (lambda line: None), tick or (lambda: None))
    try:
        lock_fd, built = _claim(spec, path, key, steps)
    except OSError as exc:  # the state directory is not ours to write, the disk is full, ...
        where = f"{exc.filename}: " if exc.filename else ""
        raise BuildError(spec.name, f"cannot make its environment in {directory}: {where}{exc.strerror}", "") from None
    env = Environment(path, key, bool(built), time.monotonic() - started, built, lock_fd)
    if built:
        remove_unused(spec, keep=key)
    return env


def _claim(spec: PipelineSpec, path: str, key: str, steps: _Steps) -> tuple[int, tuple[Built, ...]]:
    """Hold a shared lock on the complete environment at ``path``, building it first if it is not
    complete; return the lock's descriptor and what was built."""
    lock_path = path + ".lock"
    while True:
        lock_fd = _lock(lock_path, steps)
        built: tuple[Built, ...] = ()
        try:
            if not os.path.exists(os.path.join(path, _COMPLETE)):
                # flock converts a lock by dropping it first: in between, a remover may take the
                # file away; then start again on the new one
                steps.wait_for_lock(lock_fd, fcntl.LOCK_EX)  # another builder of the same key may hold it
                if _is_current(lock_fd, lock_path) and not os.path.exists(os.path.join(path, _COMPLETE)):
                    built = _build(spec, path, key, steps)
                fcntl.flock(lock_fd, fcntl.LOCK_SH)
                if not (_is_current(lock_fd, lock_path) and os.path.exists(os.path.join(path, _COMPLETE))):
                    os.close(lock_fd)
                    continue
            _link_runtime(path, verify_only=True)  # procd may have moved since (a new checkout)
        except BaseException:
            os.close(lock_fd)
            raise
        return lock_fd, built


def _lock(lock_path: str, steps: _Steps) -> int:
    """Open a lock file and take it shared (waiting for a builder), making sure it is still the
    one on disk afterwards (a remover may unlink it between our ``open`` and our lock)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            steps.wait_for_lock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        if _is_current(fd, lock_path):
            return fd
        os.close(fd)


def _is_current(fd: int, lock_path: str) -> bool:
    try:
        return os.stat(lock_path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_unused(spec: PipelineSpec, *, keep: str) -> list[str]:
    """Remove every environment of the pipeline but ``keep`` that no process holds; return their
    paths."""
    import shutil  # only a removal needs it

    directory = envs_dir(spec)
    removed: list[str] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed
    for name in names:
        if not name.endswith(".lock") or name == f"{keep}.lock":
            continue
        lock_path = os.path.join(directory, name)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # something runs in it (or builds it)
        try:
            shutil.rmtree(lock_path[: -len(".lock")] + _SCRATCH, ignore_errors=True)
            shutil.rmtree(lock_path[: -len(".lock")], ignore_errors=True)
            os.unlink(lock_path)
            removed.append(lock_path[: -len(".lock")])
        except OSError:
            pass  # left for a later removal to try again; nothing depends on it going now
        finally:
            os.close(fd)
    return removed


@dataclass(frozen=True)
class _Steps:
    """How a build reports: a line per step, and a tick while a step takes time."""

    progress: Callable[[str], None]
    tick: Callable[[], None]

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        data: bytes = b"",
        timeout_s: float | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run a program to its end, ticking meanwhile; return its exit code, stdout and stderr.
        With ``data`` (fed to its stdin), stderr is kept apart; without, it joins stdout. Past
        ``timeout_s`` it is killed and the code is ``_TIMED_OUT``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if data else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if data else subprocess.STDOUT,
        )
        while True:
            try:
                out, err = proc.communicate(data or None, timeout=_TICK_S)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    return _TIMED_OUT, out, err or b""
                self.tick()  # communicate() may be called again; nothing it read is lost
                continue
            return proc.returncode, out, err or b""

    def wait_for_lock(self, fd: int, how: int) -> None:
        """``flock(how)``, ticking while another process holds the lock against it."""
        while True:
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self.tick()
                time.sleep(0.1)


def _build(spec: PipelineSpec, path: str, key: str, steps: _Steps) -> tuple[Built, ...]:
    """Build every project and install the wheels and requirements into a new environment at
    ``path``. The build environments and wheels go to ``PATH.build``, removed afterwards; what a
    killed earlier attempt left in either is removed first (the caller holds the key's lock)."""
    import shutil  # only a build needs it

    scratch = path + _SCRATCH
    for leftover in (path, scratch):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        wheels_dir = os.path.join(scratch, "wheels")
        os.makedirs(wheels_dir)
        built = []
        for index, project in enumerate(spec.packages):
            built.append(_build_wheel(project, os.path.join(scratch, f"build-env-{index}"), wheels_dir, steps))
            steps.progress(f"built {built[-1].wheel} from {project} ({built[-1].backend})")
        try:
            _make_venv(path)
            wheels = [os.path.join(wheels_dir, b.wheel) for b in built]
            _pip_install(
                path, [*wheels, *spec.requirements], spec.name, "installing the wheels and requirements", steps
            )
            _link_runtime(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record = {
        "key": key,
        "projects": [{"project": b.project, "backend": b.backend, "wheel": b.wheel} for b in built],
        "requirements": list(spec.requirements),
        "procd": __version__,
        "built_at": time.time(),
    }
    with open(os.path.join(path, _COMPLETE), "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
    steps.progress(f"installed into {path}")
    return tuple(built)


def _build_system(project: str) -> tuple[list[str], str, list[str] | None]:
    """``[build-system]``: requires, build-backend and backend-path, with PEP 517's defaults."""
    try:
        with open(os.path.join(project, "pyproject.toml"), "rb") as fh:
            document = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BuildError(project, f"cannot read its pyproject.toml: {exc}", "") from None
    table = document.get("build-system", {})
    requires = table.get("requires", list(_DEFAULT_REQUIRES) if "build-backend" not in table else [])
    backend = table.get("build-backend", _DEFAULT_BACKEND)
    backend_path = table.get("backend-path")
    if not (isinstance(requires, list) and all(isinstance(r, str) for r in requires)):
        raise BuildError(project, "[build-system] requires must be a list of strings", "")
    if not isinstance(backend, str) or not backend:
        raise BuildError(project, "[build-system] build-backend must be a string such as setuptools.build_meta", "")
    if backend_path is not None and not (
        isinstance(backend_path, list) and all(isinstance(p, str) for p in backend_path)
    ):
        raise BuildError(project, "[build-system] backend-path must be a list of directories", "")
    return requires, backend, backend_path


def _build_wheel(project: str, build_env: str, wheels_dir: str, steps: _Steps) -> Built:
    """Build one project into ``wheels_dir`` inside a fresh, isolated build environment."""
    import pyproject_hooks  # only a build needs it

    requires, backend, backend_path = _build_system(project)
    output: list[str] = []

    def runner(cmd: Sequence[str], cwd: str | None = None, extra_environ: Any = None) -> None:
        env = {**os.environ, **(extra_environ or {})}
        env.pop("PYTHONPATH", None)  # the build sees its own environment only
        code, out, _ = steps.run(cmd, cwd=cwd, env=env)
        output.append(out.decode(errors="replace"))
        if code != 0:
            raise subprocess.CalledProcessError(code, cmd)

    _make_venv(build_env)
    if requires:
        _pip_install(build_env, requires, project, "installing its build requirements", steps)
    try:
        hooks = pyproject_hooks.BuildBackendHookCaller(
            project, backend, backend_path, runner=runner, python_executable=os.path.join(build_env, "bin", "python")
        )
    except ValueError as exc:  # a backend-path outside the project
        raise BuildError(project, f"[build-system] backend-path: {exc}", "") from None
    try:
        extra = [r for r in hooks.get_requires_for_build_wheel() if r not in requires]
        if extra:
            _pip_install(build_env, extra, project, "installing what its backend asked for", steps)
        wheel = hooks.build_wheel(wheels_dir)
    except pyproject_hooks.BackendUnavailable as exc:
        what = f"its build backend {backend} cannot be imported (is it in [build-system] requires?)"
        raise BuildError(project, what, "".join(output) + (exc.traceback or "")) from None
    except pyproject_hooks.HookMissing as exc:
        raise BuildError(project, f"its build backend {backend} has no {exc.hook_name} hook", "".join(output)) from None
    except subprocess.CalledProcessError:
        raise BuildError(project, f"its build backend {backend} failed", "".join(output)) from None
    except BuildError:
        raise  # pip could not install what the backend asked for
    except Exception as exc:  # anything else the hooks raise: a broken backend
        raise BuildError(project, f"its build backend {backend} failed: {exc}", "".join(output)) from None
    return Built(project, backend, wheel)


def _make_venv(path: str) -> None:
    import venv  # only a build needs it

    try:
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(path)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(path, f"cannot make a virtual environment there: {exc}", "") from None


def _pip_install(env: str, what: Sequence[str], project: str, doing: str, steps: _Steps) -> None:
    """``pip install`` into the environment at ``env``, with pip from procd's own interpreter."""
    if importlib.util.find_spec("pip") is None:
        raise BuildError(project, f"{doing}: procd's interpreter ({sys.executable}) has no pip", "")
    argv = [sys.executable, "-m", "pip", "--python", os.path.join(env, "bin", "python"), "install"]
    argv += ["--disable-pip-version-check", "--no-input", "--progress-bar", "off", *what]
    env_vars = dict(os.environ)
    env_vars.pop("PYTHONPATH", None)
    code, out, _ = steps.run(argv, env=env_vars)
    if code != 0:
        raise BuildError(project, f"{doing} failed (pip exited with {code})", out.decode(errors="replace"))


def _site_packages(env: str) -> str:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(env, "lib", version, "site-packages")


def _link_runtime(env: str, *, verify_only: bool = False) -> None:
    """Make procd's worker code importable in the environment (see the module's Discussion): a
    link to each top-level module of procd and of the distributions it requires, transitively.
    With ``verify_only`` (a start that reuses the environment) only the link to procd itself is
    looked at, and everything is linked again if procd has moved since."""
    runtime = os.path.join(env, _RUNTIME_DIR)
    procd_dir = os.path.dirname(os.path.abspath(__file__))
    if verify_only and os.path.realpath(os.path.join(runtime, "procd")) == os.path.realpath(procd_dir):
        return
    os.makedirs(runtime, exist_ok=True)
    for name in _runtime_modules():
        found = importlib.util.find_spec(name)
        if found is None or found.origin is None or found.origin in ("built-in", "frozen"):
            continue  # a namespace package, or nothing to link
        source = os.path.dirname(found.origin) if found.submodule_search_locations else found.origin
        link = os.path.join(runtime, os.path.basename(source))
        if os.path.islink(link) and os.readlink(link) == source:
            continue
        temporary = f"{link}.{os.getpid()}"
        os.symlink(source, temporary)
        os.replace(temporary, link)  # atomic: a worker starting now sees the old link or the new
    pth = os.path.join(_site_packages(env), "_procd_runtime.pth")
    if not os.path.exists(pth):
        with open(pth, "w", encoding="utf-8") as fh:
            fh.write(runtime + "\n")


def _runtime_modules() -> list[str]:
    """procd and the top-level modules of every distribution it requires, transitively (extras
    aside): what its worker code may import."""
    import re
    from importlib import metadata

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    try:
        metadata.distribution("procd")
    except metadata.PackageNotFoundError:
        return list(_RUNTIME_FALLBACK)
    modules_of: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(normal(dist), set()).add(module)
    modules, seen, todo = {"procd"}, {"procd"}, ["procd"]
    while todo:
        try:
            requires = metadata.distribution(todo.pop()).requires or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            named = re.match(r"[A-Za-z0-9._-]+", requirement)
            if named is None or "extra ==" in requirement.replace('"', "").replace("'", ""):
                continue
            dist = normal(named.group(0))
            if dist not in seen:
                seen.add(dist)
                todo.append(dist)
                modules |= modules_of.get(dist, set())
    return sorted(modules)


def check_stage_code(
    spec: PipelineSpec,
    env: Environment,
    *,
    reuse: bool = False,
    tick: Callable[[], None] | None = None,
    timeout_s: float = callables.IMPORT_TIMEOUT_S,
) -> dict[str, callables.StageCode]:
    """``callables.check_callables`` in the environment's interpreter (procd's own never imports
    stage code); a check that does not finish within ``timeout_s`` is a problem of every stage.

    With ``reuse``, the function stages' check that passed before in this environment for the
    same stages is not repeated (a fresh interpreter costs a start, tens of milliseconds): code
    from the environment cannot change without a new environment. It is repeated whenever a stage
    imported a module from the pipeline's directory, or something there now has the name of a
    stage's top-level module. Command stages (their programs) are always checked, here.
    """
    functions = [s for s in spec.stages if s.function is not None]
    mark = os.path.join(
        env.path, "procd-checked", hashlib.sha256(repr((spec.base_dir, functions)).encode()).hexdigest()[:16]
    )
    tops = {s.function.partition(":")[0].split(".")[0] for s in functions if s.function is not None}
    if reuse and os.path.exists(mark) and not _shadowed(spec.base_dir, tops):
        try:
            with open(mark, encoding="utf-8") as fh:
                codes = {name: callables._from_json(found) for name, found in json.load(fh).items()}
            for stage in spec.stages:
                if stage.command is not None:
                    codes[stage.name] = callables.check_stage(stage, spec.base_dir)  # imports nothing
            return codes
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a mark that cannot be read: check again
    env_vars = dict(os.environ)
    env_vars.pop("PYTHONPATH", None)
    code, out, err = _Steps(lambda line: None, tick or (lambda: None)).run(
        [env.python, "-c", "from procd.launch import environment; environment.report_check()"],
        cwd=spec.base_dir,
        env=env_vars,
        data=pickle.dumps(spec),
        timeout_s=timeout_s,
    )
    try:
        codes = {name: callables._from_json(found) for name, found in json.loads(out).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        if code == _TIMED_OUT:
            why = f"did not finish within {timeout_s:g}s"
        else:
            why = (
                f"failed (exit {code}): " + (err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"])[0]
            )
        problem = Problem("", f"checking the stage code in the environment {env.path} {why}")
        return {spec.stages[0].name: callables.StageCode((problem,))} if spec.stages else {}
    nothing_of_its_own = callables._digest({}, spec.base_dir)
    if all(not codes[s.name].problems and codes[s.name].code_hash == nothing_of_its_own for s in functions):
        os.makedirs(os.path.dirname(mark), exist_ok=True)
        with open(mark, "w", encoding="utf-8") as fh:
            json.dump({s.name: callables._as_json(codes[s.name]) for s in functions}, fh)
    return codes


def _shadowed(base_dir: str, tops: set[str]) -> bool:
    """True if the pipeline's directory holds something importable under one of ``tops``."""
    suffixes = tuple(importlib.machinery.all_suffixes())
    try:
        names = os.listdir(base_dir)
    except OSError:
        return True
    return any(name in tops or (name.endswith(suffixes) and name.partition(".")[0] in tops) for name in names)


def report_check() -> None:
    """In the environment's interpreter: check the stage code of the pickled ``PipelineSpec`` on
    standard input; write what was found, stage by stage, as JSON on standard output."""
    spec: PipelineSpec = pickle.load(sys.stdin.buffer)
    codes = callables.check_callables(spec)
    json.dump({name: callables._as_json(code) for name, code in codes.items()}, sys.stdout)


def load_and_check(
    file: str,
    *,
    apart: bool,
    timeout_s: float = callables.IMPORT_TIMEOUT_S,
    reuse: bool = False,
    tick: Callable[[], None] | None = None,
) -> tuple[PipelineSpec, Environment | None, list[Problem]]:
    """``callables.load_and_check`` for a pipeline that may have an environment: prepare it
    (``prepare``, with ``tick``) and check the stage code there (``check_stage_code``, with
    ``reuse``). A file with problems builds nothing. The environment returned is held; the caller
    releases it.

    Raises:
        ConfigError: the file cannot be read or parsed at all.
        BuildError: its environment cannot be built.
    """
    spec, problems = config.read_pipeline(file)
    if not spec.has_environment:
        codes = callables.check_callables_apart(spec, timeout_s) if apart else callables.check_callables(spec)
        spec, problems = callables.complete(spec, codes, problems)
        return spec, None, problems
    if problems:
        return spec, None, problems
    env = prepare(spec, tick=tick)
    try:
        codes = check_stage_code(spec, env, reuse=reuse, tick=tick, timeout_s=timeout_s)
    except BaseException:
        env.release()
        raise
    spec, problems = callables.complete(spec, codes, problems)
    return spec, env, problems
