"""`kktd mock-atol` as its own process for the end-to-end tests: its documents outlive any kktd crash.

And the flags that point a kktd process at it (upstream atol-online-v5).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.runner import Child, free_port
from tests.support import KKTD_BIN, child_env

MOCK_LOGIN = "kktd-mock"
MOCK_GROUP = "kktd-mock-group"
MOCK_INN = "5544332219"


@dataclass
class MockAtolProcess:
    workdir: Path
    seed: int | None = 1
    port: int = field(default_factory=free_port)
    password: str = "mock-atol-password-e2e"
    child: Child | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.proc if self.child is not None else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/possystem/v5"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/admin"

    @property
    def password_file(self) -> Path:
        path = self.workdir / "atol_password"
        if not path.exists():
            path.write_text(self.password + "\n")
            path.chmod(0o600)
        return path

    def start(self, **behaviour: Any) -> MockAtolProcess:
        args = [
            str(KKTD_BIN),
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
        log_path = self.workdir / f"mock-atol-{self.port}.log"
        self.child = Child("the ATOL mock", args, log_path, env=child_env()).start()
        self.child.wait_until(self._answers, 15, "its admin API to answer")
        if behaviour:
            self.set_behaviour(**behaviour)
        return self

    def _answers(self) -> bool:
        try:
            self._admin("GET", "/behaviour")
        except OSError:
            return False
        return True

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.admin_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def set_behaviour(self, **changes: Any) -> dict[str, Any]:
        return dict(self._admin("POST", "/behaviour", changes))

    def expire_tokens(self) -> int:
        return int(self._admin("POST", "/expire-tokens", {})["expired"])

    def stats(self) -> dict[str, Any]:
        return dict(self._admin("GET", "/stats"))

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

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(10)
        self.child = None


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
