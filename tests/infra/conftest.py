"""Fixtures of the infra tests: the repo paths and a scratch copy of infra/."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"


def pytest_configure(config: pytest.Config) -> None:
    # Registered here as well so the marker is known even where pyproject.toml lacks it.
    config.addinivalue_line(
        "markers", "infra: runs checkov through infra/check.sh (slow; bootstraps .venv-infra)"
    )


@dataclass(frozen=True)
class CheckRun:
    returncode: int
    output: str


def run_check(directory: Path) -> CheckRun:
    """bash infra/check.sh DIRECTORY, stdout and stderr together."""
    proc = subprocess.run(
        ["bash", str(INFRA / "check.sh"), str(directory)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        check=False,
    )
    return CheckRun(proc.returncode, proc.stdout)


@pytest.fixture(scope="session")
def real_infra_check() -> CheckRun:
    """One run on the real infra/ (the first one also bootstraps .venv-infra)."""
    return run_check(INFRA)


@pytest.fixture
def infra_copy(tmp_path: Path, real_infra_check: CheckRun) -> Path:
    """A scratch copy of infra/ to break on purpose (after the venv exists)."""
    target = tmp_path / "infra"
    shutil.copytree(INFRA, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target
