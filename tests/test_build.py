"""Stage code as real Python projects: real PEP 517 builds into the pipeline's own environment.

Every build here is real (a setuptools backend, an in-tree backend through backend-path) and
offline: pip installs only from the wheelhouse that ``.ci/run`` downloads first (``.wheelhouse/``,
git-ignored); a test session without one makes it, or fails saying how.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import PIPELINES, WHEELHOUSE, Workspace, read_records, wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def offline(offline_pip: None) -> None:
    """Every build here installs from the wheelhouse only."""


def setuptools_project(ws: Workspace, directory: str, version: str, *, dependencies: str = '["six"]') -> None:
    """A project ``stagepkg`` (setuptools backend) whose stages say their version and six's."""
    ws.write(
        f"{directory}/pyproject.toml",
        f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "stagepkg"
        version = "{version}"
        dependencies = {dependencies}
        """,
    )
    ws.write(
        f"{directory}/stagepkg/__init__.py",
        f"""
        import sys
        import time
        import six

        VERSION = "{version}"

        def numbers(count=3):
            yield from range(count)

        def ticks():
            while True:
                yield VERSION
                time.sleep(0.05)

        def show(item):
            print(f"{{VERSION}} six={{six.__version__}} prefix={{sys.prefix}} item={{item}}", flush=True)
        """,
    )


def pipeline(
    ws: Workspace,
    packages: str,
    *,
    method: str = "forkserver",
    producer: str = "numbers",
    extra: str = "",
    stem: str | None = None,
    name: str | None = None,
) -> Path:
    return ws.pipeline(
        f"""
        [pipeline]
        name = "{name or ws.name}"
        start_method = "{method}"
        state_dir = "state-{stem or ws.name}"
        packages = {packages}

        [stages.source]
        function = "stagepkg:{producer}"

        [stages.show]
        function = "stagepkg:show"
        inputs = ["source"]
        """
        + textwrap.dedent(extra),
        stem=stem,
    )


def environments(ws: Workspace, stem: str | None = None) -> list[Path]:
    envs = ws.path / f"state-{stem or ws.name}" / "envs"
    return sorted(p for p in envs.iterdir() if p.is_dir() and not p.name.startswith(".")) if envs.exists() else []


def test_a_setuptools_project_with_a_dependency_procd_lacks_runs_in_its_own_environment(ws: Workspace) -> None:
    assert importlib.util.find_spec("six") is None, "procd's own interpreter must not have six for this test"
    setuptools_project(ws, "stages", "1.0")
    pipeline(ws, '["stages"]')
    result = ws.run("run", f"{ws.name}.toml", timeout=180)
    assert result.code == 0, result.stderr[-3000:]
    (built,) = result.events("environment_built")
    assert built["projects"] == [str(ws.path / "stages")]
    (env,) = environments(ws)
    assert built["path"] == str(env)
    six_version = next(WHEELHOUSE.glob("six-*.whl")).name.split("-")[1]
    assert result.output_lines("show") == [f"1.0 six={six_version} prefix={env} item={n}" for n in range(3)]
    # the wheel is installed (not the source tree on a path), with its dependency
    site = next(env.glob("lib/python*/site-packages"))
    assert list(site.glob("stagepkg-1.0.dist-info")) and list(site.glob("six-*.dist-info"))
    assert not (site / "setuptools").exists()  # build requirements stay in the build environment


def test_an_in_tree_backend_through_backend_path(ws: Workspace) -> None:
    ws.write(
        "intree/pyproject.toml",
        """
        [build-system]
        requires = []
        build-backend = "wheelmaker"
        backend-path = ["_backend"]
        """,
    )
    ws.write(
        "intree/_backend/wheelmaker.py",
        '''
        """A backend that zips src/ into a wheel: only the standard library."""
        import base64, hashlib, os, zipfile

        NAME, VERSION = "intreepkg", "0.3"

        def get_requires_for_build_wheel(config_settings=None):
            return []

        def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
            name = f"{NAME}-{VERSION}-py3-none-any.whl"
            info = f"{NAME}-{VERSION}.dist-info"
            files = {}
            for root, _, names in os.walk("src"):
                for n in names:
                    if n.endswith(".py"):
                        path = os.path.join(root, n)
                        files[os.path.relpath(path, "src")] = open(path, "rb").read()
            files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: {VERSION}\\n".encode()
            files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\\nGenerator: wheelmaker\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
            record = []
            for path, data in files.items():
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record.append(f"{path},sha256={digest},{len(data)}")
            record.append(f"{info}/RECORD,,")
            files[f"{info}/RECORD"] = ("\\n".join(record) + "\\n").encode()
            with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
                for path, data in files.items():
                    wheel.writestr(path, data)
            return name
        ''',
    )
    ws.write(
        "intree/src/stagepkg/__init__.py",
        """
        import sys
        def numbers(count=3):
            yield from range(count)
        def show(item):
            print(f"intree prefix={sys.prefix} item={item}", flush=True)
        """,
    )
    pipeline(ws, '["intree"]', method="spawn")
    result = ws.run("run", f"{ws.name}.toml", timeout=180)
    assert result.code == 0, result.stderr[-3000:]
    (env,) = environments(ws)
    assert sorted(result.output_lines("show")) == [f"intree prefix={env} item={n}" for n in range(3)]
    site = next(env.glob("lib/python*/site-packages"))
    assert (site / "intreepkg-0.3.dist-info").is_dir()


def test_two_pipelines_pin_two_versions_of_one_stage_project_side_by_side(ws: Workspace) -> None:
    setuptools_project(ws, "v1", "1.0")
    setuptools_project(ws, "v2", "2.0")
    procs = {}
    try:
        for version, stem in (("v1", "one"), ("v2", "two")):
            pipeline(ws, f'["{version}"]', producer="ticks", stem=stem, name=f"{ws.name}-{stem}")
            procs[stem] = ws.start(
                "run", f"{stem}.toml", "--log-file", f"{stem}.jsonl", "--control", str(ws.path / f"{stem}.sock")
            )

        def said(stem: str) -> set[str]:
            return {
                r["line"].split()[0] for r in read_records(ws.path / f"{stem}.jsonl") if r["event"] == "worker_output"
            }

        wait_until(lambda: said("one") and said("two"), timeout=180)
        # both run at once, each with its own version
        assert all(proc.poll() is None for proc in procs.values())
        assert said("one") == {"1.0"} and said("two") == {"2.0"}
        assert environments(ws, "one") != environments(ws, "two")
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.communicate(timeout=60)
    assert [proc.returncode for proc in procs.values()] == [0, 0]


def reload(ws: Workspace) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procd", "reload", "--control", str(ws.control)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_a_changed_project_is_rebuilt_on_reload_and_only_its_stages_restart(ws: Workspace) -> None:
    setuptools_project(ws, "stages", "1.0")
    pipeline(
        ws,
        '["stages"]',
        producer="ticks",
        extra="""
        [stages.idle]
        command = ["sleep", "600"]
        """,
    )
    proc = ws.start_ready(timeout=180)
    log = ws.path / "log.jsonl"
    try:
        wait_until(
            lambda: [r for r in read_records(log) if r["event"] == "worker_output" and r["line"].startswith("1.0 ")]
        )
        (old_env,) = environments(ws)
        assert reload(ws).returncode == 0  # nothing changed: nothing restarts
        source = ws.path / "stages" / "stagepkg" / "__init__.py"
        source.write_text(source.read_text().replace('VERSION = "1.0"', 'VERSION = "2.0"'))
        reply = reload(ws)
        assert reply.returncode == 0, reply.stderr
        wait_until(
            lambda: [r for r in read_records(log) if r["event"] == "worker_output" and r["line"].startswith("2.0 ")],
            timeout=30,
        )
        # the old environment goes once its last worker has exited
        wait_until(lambda: not old_env.exists(), timeout=30)
        # a build that fails changes nothing
        pyproject = ws.path / "stages" / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace('requires = ["setuptools>=64"]', "requires = []"))
        failed = reload(ws)
        assert failed.returncode == 1
        assert failed.stderr.startswith(f"procd reload: cannot build {ws.path / 'stages'}: its build backend")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    records = read_records(log)
    unchanged, reloaded = [r for r in records if r["event"] == "pipeline_reloaded"]
    assert unchanged["changed"] == [] and unchanged["unchanged"] == ["idle", "show", "source"]
    assert reloaded["changed"] == ["show", "source"] and reloaded["unchanged"] == ["idle"]
    (build_failed,) = [r for r in records if r["event"] == "environment_build_failed"]
    assert build_failed["project"] == str(ws.path / "stages")
    assert [r["path"] for r in records if r["event"] == "environment_removed"] == [str(old_env)]
    spawned = [(r["stage"], r["generation"]) for r in records if r["event"] == "worker_spawned"]
    assert sorted(spawned) == [("idle", 1), ("show", 1), ("show", 2), ("source", 1), ("source", 2)]
    (new_env,) = environments(ws)
    assert new_env != old_env
    new_lines = [r["line"] for r in records if r["event"] == "worker_output" and r["line"].startswith("2.0 ")]
    assert all(f"prefix={new_env} " in line for line in new_lines)


BROKEN = {
    "syntax error in setup.py": (
        {
            "pyproject.toml": '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n',
            "setup.py": "from setuptools import setup\nsetup(name='broken', version='1.0'\n",
        },
        "its build backend setuptools.build_meta failed",
        "SyntaxError",
    ),
    "backend not among the build requirements": (
        {"pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "setuptools.build_meta"\n'},
        "its build backend setuptools.build_meta cannot be imported (is it in [build-system] requires?)",
        "ModuleNotFoundError: No module named 'setuptools'",
    ),
    "a build requirement nowhere to be had": (
        {
            "pyproject.toml": '[build-system]\nrequires = ["setuptools>=64", "procd-no-such-build-dep"]\n'
            'build-backend = "setuptools.build_meta"\n'
        },
        "installing its build requirements failed (pip exited with 1)",
        "No matching distribution found for procd-no-such-build-dep",
    ),
    "a backend-path outside the project": (
        {"pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "b"\nbackend-path = [".."]\n'},
        "[build-system] backend-path: paths must be inside source tree",
        "",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_build_names_the_project_shows_its_output_and_starts_nothing(ws: Workspace, case: str) -> None:
    files, what, in_tail = BROKEN[case]
    for name, text in files.items():
        ws.write(f"broken/{name}", text)
    ws.write("broken/broken.py", "def numbers():\n    yield 1\n")
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nstart_method = "spawn"\nstate_dir = "state-{ws.name}"\npackages = ["broken"]\n'
        '[stages.numbers]\nfunction = "broken:numbers"\n'
    )
    project = ws.path / "broken"
    built = ws.run("build", f"{ws.name}.toml", timeout=180)
    assert built.code == 1
    first, *tail = built.stderr.splitlines()
    assert first == f"procd build: cannot build {project}: {what}"
    assert any(in_tail in line for line in tail) if in_tail else tail == [], built.stderr

    result = ws.run("run", f"{ws.name}.toml", "--log-file", "log.jsonl", timeout=180)
    assert result.code == 1
    assert [r["event"] for r in result.records] == ["environment_build_failed"]  # nothing started
    (failed,) = result.records
    assert failed["project"] == str(project) and failed["error"] == f"cannot build {project}: {what}"
    assert in_tail in failed["output_tail"]
    assert read_records(ws.path / "log.jsonl") == result.records
    assert environments(ws) == []  # nothing half made


def test_build_twice_reuses_the_environment_and_removes_the_replaced_one(ws: Workspace) -> None:
    setuptools_project(ws, "stages", "1.0")
    pipeline(ws, '["stages"]')
    first = ws.run("build", f"{ws.name}.toml", timeout=180)
    assert first.code == 0, first.stderr
    (env,) = environments(ws)
    assert first.stdout.splitlines() == [
        f"built stagepkg-1.0-py3-none-any.whl from {ws.path / 'stages'} (setuptools.build_meta)",
        f"installed into {env}",
        first.stdout.splitlines()[-1],
    ]
    assert first.stdout.splitlines()[-1].startswith(f"environment {env}: built in ")
    marker = env / "procd-environment.json"
    built_at = json.loads(marker.read_text())["built_at"]

    second = ws.run("build", f"{ws.name}.toml", timeout=60)
    assert second.code == 0, second.stderr
    (line,) = second.stdout.splitlines()
    assert line.startswith(f"environment {env}: up to date, reused in ")
    assert json.loads(marker.read_text())["built_at"] == built_at

    # what a build leaves in the source tree (build/, *.egg-info) is not a change
    assert (ws.path / "stages" / "build").exists()
    # a real change: a new environment, and the old one, which nothing runs in, is removed
    ws.write("stages/stagepkg/extra.py", "X = 1\n")
    third = ws.run("build", f"{ws.name}.toml", timeout=180)
    assert third.code == 0, third.stderr
    (new_env,) = environments(ws)
    assert new_env != env and not env.exists()


def test_check_imports_stage_code_inside_the_environment(ws: Workspace) -> None:
    setuptools_project(ws, "stages", "1.0")
    pipeline(ws, '["stages"]')
    result = ws.run("check", f"{ws.name}.toml", timeout=180)
    assert result.code == 0, result.stderr
    (env,) = environments(ws)
    assert result.stdout == f"{ws.name}.toml: ok (2 stages, 2 processes; environment {env})\n"
    text = (ws.path / f"{ws.name}.toml").read_text().replace("stagepkg:show", "stagepkg:missing")
    (ws.path / f"{ws.name}.toml").write_text(text)
    result = ws.run("check", f"{ws.name}.toml", timeout=60)
    assert result.code == 78
    assert result.stderr == f'{ws.name}.toml: stages.show.function: module "stagepkg" has no attribute "missing"\n'


def test_fork_with_packages_is_a_config_error_that_says_why(ws: Workspace) -> None:
    setuptools_project(ws, "stages", "1.0")
    path = pipeline(ws, '["stages", "nowhere"]', method="fork")
    result = ws.run("check", path.name)
    assert result.code == 78
    assert result.stderr.splitlines() == [
        f"{path.name}: pipeline.packages[1]: expected a project directory with a pyproject.toml, relative to the "
        f'pipeline file; "{ws.path / "nowhere"}" has none',
        f'{path.name}: pipeline.start_method: "fork" (the default) cannot run stage code from the pipeline\'s '
        'environment, which "packages" asks for: a forked worker is a copy of procd\'s own interpreter, which does '
        'not have the environment\'s packages; set start_method = "forkserver" (fast restarts) or "spawn"',
    ]
    assert not (ws.path / f"state-{ws.name}").exists()


def test_a_pipeline_without_packages_has_nothing_to_build(ws: Workspace) -> None:
    ws.write("st.py", "def numbers():\n    yield 1\n")
    ws.pipeline('[stages.numbers]\nfunction = "st:numbers"\n')
    result = ws.run("build", f"{ws.name}.toml")
    assert result.code == 0
    assert result.stdout == f"{ws.name}.toml: no packages or requirements; its workers run in procd's own interpreter\n"


def test_the_example_stage_project_runs(ws: Workspace) -> None:
    result = ws.run("run", str(PIPELINES / "textstats.toml"), timeout=180)
    assert result.code == 0, result.stderr[-3000:]
    assert result.output_lines("count") == [
        "textstats 1.0.0: 11200 words; most common: a 1000, the 600, is 400, stage 400, with 400"
    ]


def test_a_run_imports_the_stage_code_again_when_the_functions_change(ws: Workspace) -> None:
    setuptools_project(ws, "stages", "1.0")
    path = pipeline(ws, '["stages"]')
    assert ws.run("run", path.name, timeout=180).code == 0
    # the second run reuses the check made in this environment; a new function name is checked
    path.write_text(path.read_text().replace("stagepkg:show", "stagepkg:missing"))
    result = ws.run("run", path.name, "--log-file", "log.jsonl", timeout=60)
    assert result.code == 78
    (invalid,) = [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "config_invalid"]
    assert invalid["problems"] == [f'{path.name}: stages.show.function: module "stagepkg" has no attribute "missing"']


SLOW_BACKEND = """
import os, time, zipfile

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    if os.path.exists("slow"):
        time.sleep(3)
    name = "slowpkg-1.0-py3-none-any.whl"
    source = open("slowpkg.py").read()
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        wheel.writestr("slowpkg.py", source)
        wheel.writestr("slowpkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\\nName: slowpkg\\nVersion: 1.0\\n")
        wheel.writestr("slowpkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")
        wheel.writestr("slowpkg-1.0.dist-info/RECORD", "")
    return name
"""


def test_a_build_keeps_the_service_manager_waiting_and_the_watchdog_fed(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_notify import Receiver

    receiver = Receiver(ws.path / "notify.sock")
    ws.write("slow/pyproject.toml", '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n')
    ws.write("slow/backend.py", SLOW_BACKEND)
    ws.write(
        "slow/slowpkg.py",
        "import time\ndef ticks():\n    while True:\n        yield 1\n        time.sleep(0.05)\ndef same(n):\n    return n\n",
    )
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nstart_method = "spawn"\nstate_dir = "state"\npackages = ["slow"]\n'
        '[stages.ticks]\nfunction = "slowpkg:ticks"\n[stages.same]\nfunction = "slowpkg:same"\ninputs = ["ticks"]\n'
    )
    monkeypatch.setenv("NOTIFY_SOCKET", str(ws.path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    (ws.path / "slow" / "slow").touch()
    proc = ws.start("run", f"{ws.name}.toml", "--log-file", "log.jsonl")
    try:
        wait_until(lambda: "READY" in receiver.sent_keys(), timeout=120)
        # the first start built for 3 s: systemd was asked for more time to start meanwhile
        assert receiver.sent_keys()[:2] == ["EXTEND_TIMEOUT_USEC", "EXTEND_TIMEOUT_USEC"]
        (ws.path / "slow" / "slowpkg.py").write_text((ws.path / "slow" / "slowpkg.py").read_text() + "# changed\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(
            lambda: [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "pipeline_reloaded"], timeout=60
        )
        keys = receiver.sent_keys()
        during = keys[keys.index("RELOADING") : keys.index("READY", keys.index("RELOADING"))]
        # the loop was blocked by the 3 s build for longer than the 2 s watchdog; it still pinged
        assert during.count("WATCHDOG") >= 2, keys
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_a_state_directory_inside_the_project_is_not_part_of_it(ws: Workspace) -> None:
    setuptools_project(ws, ".", "1.0", dependencies="[]")
    ws.write(
        "pyproject.toml", (ws.path / "pyproject.toml").read_text() + '\n[tool.setuptools]\npackages = ["stagepkg"]\n'
    )
    pipeline(ws, '["."]')  # the pipeline's directory is the project; its state directory is inside
    first = ws.run("build", f"{ws.name}.toml", timeout=180)
    assert first.code == 0, first.stderr
    second = ws.run("build", f"{ws.name}.toml", timeout=60)
    assert second.code == 0, second.stderr
    assert ": up to date, reused in " in second.stdout


def test_what_a_killed_build_left_is_removed_by_the_next(ws: Workspace) -> None:
    from procd import config
    from procd.launch import environment

    setuptools_project(ws, "stages", "1.0", dependencies="[]")
    path = pipeline(ws, '["stages"]')
    key = environment.environment_key(config.load_pipeline(path))
    envs = ws.path / f"state-{ws.name}" / "envs"
    for leftover in (envs / key / "half-installed", envs / f"{key}.build" / "wheels" / "half.whl"):
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_text("")
    result = ws.run("build", path.name, timeout=180)
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in envs.iterdir()) == [key, f"{key}.lock"]
    assert not (envs / key / "half-installed").exists()


def test_two_builds_at_once_build_once(ws: Workspace) -> None:
    setuptools_project(ws, "stages", "1.0", dependencies="[]")
    path = pipeline(ws, '["stages"]')
    builds = [ws.start("build", path.name) for _ in range(2)]
    outputs = [proc.communicate(timeout=180) for proc in builds]
    assert [proc.returncode for proc in builds] == [0, 0], outputs
    (env,) = environments(ws)
    last_lines = sorted(out.splitlines()[-1] for out, _err in outputs)
    assert last_lines[0].startswith(f"environment {env}: built in ")
    assert last_lines[1].startswith(f"environment {env}: up to date, reused in ")  # it waited for the other
