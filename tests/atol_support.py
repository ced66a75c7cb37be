"""`kktd mock-atol` as its own process for the end-to-end tests: its documents outlive any kktd crash.

And the flags that point a kktd process at it (upstream atol-online-v5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.mock_process import MockProcess

MOCK_LOGIN = "kktd-mock"
MOCK_GROUP = "kktd-mock-group"
MOCK_INN = "5544332219"


@dataclass
class MockAtolProcess(MockProcess):
    seed: int | None = 1
    password: str = "mock-atol-password-e2e"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/possystem/v5"

    @property
    def password_file(self) -> Path:
        return self.secret_file("atol_password", self.password)

    def start(self, **behaviour: Any) -> MockAtolProcess:
        args = [
            "mock-atol",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--login",
            MOCK_LOGIN,
            "--password",
            self.password,
            "--group-code",
            MOCK_GROUP,
            "--inn",
            MOCK_INN,
            "--log-level",
            "warning",
        ]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        self._start("the ATOL mock", args, behaviour)
        return self

    def expire_tokens(self) -> int:
        return int(self._admin("POST", "/expire-tokens", {})["expired"])

    def documents(self) -> list[dict[str, Any]]:
        return list(self._admin("GET", "/documents")["documents"])

    def kktd_args(self, *extra: str) -> list[str]:
        """`kktd serve` flags for upstream atol-online-v5 against this mock."""
        return [
            "--upstream",
            "atol-online-v5",
            "--atol-url",
            self.url,
            "--atol-login",
            MOCK_LOGIN,
            "--atol-group-code",
            MOCK_GROUP,
            "--atol-password-file",
            str(self.password_file),
            "--company-inn",
            MOCK_INN,
            "--company-email",
            "shop@example.ru",
            "--company-payment-address",
            "https://shop.example.ru",
            *extra,
        ]


def fiscalized_once(documents: list[dict[str, Any]], external_ids: dict[str, str]) -> list[str]:
    """Problems with the mock's documents against kktd's receipts (receipt id -> its final external_id):
    every receipt fiscalized under its external_id, and no document fiscalized beyond one per receipt."""
    problems: list[str] = []
    done = {d["external_id"]: d for d in documents if d["fiscalized"]}
    for receipt_id, external_id in external_ids.items():
        if external_id not in done:
            problems.append(f"receipt {receipt_id}: no fiscalized document under external_id {external_id}")
    extra = set(done) - set(external_ids.values())
    if extra:
        problems.append(
            f"{len(extra)} fiscalized documents belong to no receipt's final external_id: "
            f"{sorted(extra)[:5]} (a receipt fiscalized twice)"
        )
    return problems
