"""`kktd mock-atol-driver` (a simulated register behind ATOL driver v10's web server) as its own process for
the end-to-end tests: its documents outlive any kktd crash. And the flags that point kktd at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.mock_process import MockProcess

RECEIPT_TYPES = frozenset({"sell", "sellReturn", "buy", "buyReturn"})


@dataclass
class MockRegisterProcess(MockProcess):
    login: str = "kktd"
    password: str = "mock-register-password-e2e"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.secret_file("atol_driver_password", self.password)

    def start(self, print_time: float = 0.0, clock_offset: float = 0.0, **behaviour: Any) -> MockRegisterProcess:
        args = [
            "mock-atol-driver",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--print-time",
            str(print_time),
            "--login",
            self.login,
            "--password",
            self.password,
            "--log-level",
            "warning",
        ]
        if clock_offset:
            args.append(f"--clock-offset={clock_offset}")  # the = keeps a negative offset a value
        self._start("the register mock", args, behaviour)
        return self

    def advance_clock(self, seconds: float) -> None:
        self._admin("POST", "/clock", {"advance_s": seconds})

    def documents(self) -> list[dict[str, Any]]:
        return list(self._admin("GET", "/documents")["documents"])

    def receipts(self) -> list[dict[str, Any]]:
        return [d for d in self.documents() if d["type"] in RECEIPT_TYPES]

    def kktd_args(self, *extra: str) -> list[str]:
        """`kktd serve` flags for upstream atol-driver against this mock."""
        return [
            "--upstream",
            "atol-driver",
            "--atol-driver-url",
            self.url,
            "--atol-driver-login",
            self.login,
            "--atol-driver-password-file",
            str(self.password_file),
            "--cashier-name",
            "Иванова А. А.",
            *extra,
        ]
