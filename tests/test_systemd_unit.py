"""The shipped unit file, checked by systemd's own verifier against the installed procd."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

UNIT = REPO / "systemd" / "procd@.service"
PROCD = Path(sys.executable).parent / "procd"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def _verify(tmp_path: Path, text: str, name: str = "procd@etl.service") -> subprocess.CompletedProcess[str]:
    unit = tmp_path / name
    unit.write_text(text.replace("/opt/procd/bin/procd", str(PROCD)))
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def test_the_unit_verifies_with_nothing_on_stderr(tmp_path: Path) -> None:
    assert PROCD.exists(), f"procd is not installed next to {sys.executable}"
    result = _verify(tmp_path, UNIT.read_text())
    assert result.stderr == "", result.stderr
    assert result.returncode == 0


def test_the_verifier_would_catch_a_mistake(tmp_path: Path) -> None:
    # systemd-analyze exits 0 for unknown keys and bad values: only stderr tells
    result = _verify(tmp_path, UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd\nFooBar=1"))
    assert "Failed to parse kill mode" in result.stderr and "Unknown key 'FooBar'" in result.stderr


def test_the_unit_says_what_procd_needs() -> None:
    lines = [line for line in UNIT.read_text().splitlines() if line and not line.startswith("#")]
    settings = dict(line.split("=", 1) for line in lines if "=" in line)
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed" and settings["RestartPreventExitStatus"] == "78"
    assert settings["ExecStart"] == "/opt/procd/bin/procd run /etc/procd/%i.toml"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["User"] == "procd" and settings["StateDirectory"] == "procd procd/%i"
    assert settings["WorkingDirectory"] == "%S/procd/%i"
    assert settings["RuntimeDirectory"] == "procd" and settings["RuntimeDirectoryMode"] == "0700"
    for key in ("WatchdogSec", "TimeoutStopSec", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert key in settings
    # systemd does not strip a trailing comment from a value
    assert not [line for line in lines if "#" in line], "a comment must stand on a line of its own"
