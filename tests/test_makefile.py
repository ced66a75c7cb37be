"""The Makefile's promises that no other test sees: `make run` sets up only what the daemon needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import REPO


def dry_run(target: str, tmp_path: Path) -> list[str]:
    """The commands `make TARGET` would run from nothing (a venv that does not exist yet), none executed."""
    argv = ["make", "-n", "-B", target, f"VENV={tmp_path / 'venv'}", f"STATE_DIR={tmp_path / 'state'}"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.splitlines()


def test_make_run_installs_only_what_the_daemon_needs(tmp_path: Path) -> None:
    installs = [line for line in dry_run("run", tmp_path) if "pip install" in line]
    assert installs, "make run installs kktd"
    assert all("[test" not in line and "bench" not in line for line in installs), installs


def test_make_check_adds_the_test_tools(tmp_path: Path) -> None:
    installs = [line for line in dry_run("check", tmp_path) if "pip install" in line]
    assert any(".[test,bench]" in line for line in installs), installs
