"""A private sd_notify socket: the benchmark plays systemd to time kktd's READY=1 exactly."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from proc import BenchError


class NotifySocket:
    """An AF_UNIX datagram socket bound at `path`; pass it to the child as NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __enter__(self) -> NotifySocket:
        self.path.unlink(missing_ok=True)
        self._sock.bind(str(self.path))
        return self

    def __exit__(self, *_: object) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def wait_for(
        self, line: str, since: float, process: subprocess.Popen[bytes] | None, timeout_s: float = 120.0
    ) -> float:
        """Seconds from `since` (time.monotonic) until a datagram holding `line` arrives."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Short receive timeouts so a process that died is noticed instead of waited out.
            self._sock.settimeout(0.2)
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                if process is not None and process.poll() is not None:
                    raise BenchError(f"the process exited with {process.returncode} before {line}") from None
                continue
            arrived = time.monotonic()
            text = data.decode(errors="replace")
            self.messages.append(text)
            if line in text.splitlines():
                return arrived - since
        raise BenchError(f"no {line} within {timeout_s:.0f}s; got {self.messages}")
