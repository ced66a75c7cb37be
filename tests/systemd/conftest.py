"""Fixtures: one disposable systemd per test module, kktd.service installed in it, reset after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require

from .kktd_unit import KktdUnit
from .systemd_sandbox import Sandbox, boot, missing_prerequisites

CHECKOUT = Path(__file__).resolve().parents[2]
VENV = CHECKOUT / ".venv"
UNIT_FILE = CHECKOUT / "systemd" / "kktd.service"
SYSUSERS_FILE = CHECKOUT / "systemd" / "kktd.sysusers"
BOOT_NOTES: list[str] = []
SUMMARY: list[str] = []  # figures the tests measured, printed at the end of the run


def require_prerequisites() -> None:
    """Non-root local runs skip with the reason; in CI (CI=true) or as root anything missing fails."""
    missing = missing_prerequisites()
    if not (VENV / "bin" / "python").exists():
        missing.append(f"the checkout's venv at {VENV} (make test builds it)")
    require(
        not missing,
        "systemd sandbox tests need root (unshare, mount, a disposable systemd as PID 1); "
        "missing: " + ", ".join(missing),
        as_root_too=True,
    )


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    require_prerequisites()
    box = boot(CHECKOUT)
    BOOT_NOTES.extend(box.boot_notes)
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(scope="module")
def installed_kktd(sandbox: Sandbox) -> KktdUnit:
    unit = KktdUnit(sandbox, UNIT_FILE, SYSUSERS_FILE, VENV)
    unit.install()
    return unit


@pytest.fixture
def kktd(installed_kktd: KktdUnit) -> Iterator[KktdUnit]:
    """kktd.service as shipped (plus the test drop-in), stopped and without state before and after."""
    installed_kktd.reset()
    try:
        yield installed_kktd
    finally:
        installed_kktd.reset()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if BOOT_NOTES or SUMMARY:
        terminalreporter.section("systemd sandbox")
        for line in BOOT_NOTES + SUMMARY:
            terminalreporter.write_line(line)
