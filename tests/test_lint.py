"""The code's own checks: ruff (lint and format) and mypy --strict on the package."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=240)


def test_ruff_finds_nothing() -> None:
    lint = _run("ruff", "check", "--output-format", "concise", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    form = _run("ruff", "format", "--check", ".")
    assert form.returncode == 0, form.stdout + form.stderr


def test_mypy_strict_finds_nothing() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
