"""An upstream's mock (`kktd mock-…`) as its own process for the end-to-end tests, so its documents outlive
every kktd crash: started with its log in the test's directory, its admin API (`/admin/…` on the same port)
answered before the test goes on, stopped after the test whatever its state."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.runner import Child, free_port
from tests.support import KKTD_BIN, child_env


@dataclass
class MockProcess:
    workdir: Path
    port: int = field(default_factory=free_port)
    child: Child | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.proc if self.child is not None else None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/admin"

    def secret_file(self, name: str, secret: str) -> Path:
        """A file holding `secret` (as kktd reads a password), made on first use."""
        path = self.workdir / name
        if not path.exists():
            path.write_text(secret + "\n")
            path.chmod(0o600)
        return path

    def _start(self, what: str, args: list[str], behaviour: dict[str, Any]) -> None:
        log_path = self.workdir / f"{args[0]}-{self.port}.log"
        self.child = Child(what, [str(KKTD_BIN), *args], log_path, env=child_env()).start()
        self.child.wait_until(self._answers, 15, "its admin API to answer")
        if behaviour:
            self.set_behaviour(**behaviour)

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

    def stats(self) -> dict[str, Any]:
        return dict(self._admin("GET", "/stats"))

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(10)
        self.child = None
