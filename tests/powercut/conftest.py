"""Fixtures for the power-cut tests: prerequisites, a mount lab that is always torn down, summary."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require

from .harness import SUMMARY, PowerCutLab


def _missing_prerequisites() -> list[str]:
    missing = []
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    if shutil.which("fusermount3") is None:
        missing.append("fusermount3 (Debian package fuse3)")
    try:
        import mfusepy  # noqa: F401  (raises OSError when libfuse3 is not installed)
    except (ImportError, OSError) as exc:
        missing.append(f"mfusepy/libfuse3 ({exc})")
    return missing


@pytest.fixture(scope="session")
def fuse_available() -> None:
    """Non-root local runs may skip; in CI (CI=true) or as root a missing piece is a failure."""
    require(os.geteuid() == 0, "power-cut tests mount FUSE filesystems: run as root")
    missing = _missing_prerequisites()
    require(not missing, "power-cut prerequisites missing: " + ", ".join(missing), as_root_too=True)


@pytest.fixture
def lab(fuse_available: None, tmp_path: Path) -> Iterator[PowerCutLab]:
    lab = PowerCutLab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("power-cut summary")
        for line in SUMMARY:
            terminalreporter.write_line(line)
