"""Signals kktd does not stop on: SIGUSR1 and SIGUSR2 log one status line, SIGPIPE is ignored; kktd keeps
serving and still stops cleanly on SIGTERM afterwards."""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path

import pytest

from tests.support import KktdProcess, post_many, receipts, wait_until

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process


@pytest.mark.parametrize(
    "signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE], ids=lambda s: signal.Signals(s).name
)
def test_signal_is_handled_deliberately_and_kktd_keeps_serving(
    kktds: list[KktdProcess], tmp_path: Path, signum: int
) -> None:
    kktd = KktdProcess(tmp_path / "buffer.db", env={"KKTD_LOG_LEVEL": "info"})
    kktds.append(kktd)
    kktd.start()
    name = signal.Signals(signum).name
    for round_number in range(3):  # not a one-off: each time
        kktd.signal(signum)
        if signum != signal.SIGPIPE:
            wait_until(
                functools.partial(_status_lines_reach, kktd, name, round_number + 1),
                10,
                f"the {name} status line",
            )
        answers = asyncio.run(post_many(kktd.url, receipts(f"{name}-{round_number}", 5)))
        assert [answer.status for answer in answers] == [201] * 5
        assert kktd.proc is not None and kktd.proc.poll() is None
    lines = [line for line in kktd.log().splitlines() if name in line]
    assert len(lines) == (0 if signum == signal.SIGPIPE else 3), lines  # one line per event
    if signum != signal.SIGPIPE:
        assert "pending=10" in lines[-1]  # sent before the third batch and "connections=" in lines[-1]
    kktd.signal(signal.SIGTERM)
    assert kktd.wait() == 0
    assert "Traceback" not in kktd.log()


def test_an_undrained_notify_socket_never_blocks_serving(kktds: list[KktdProcess], tmp_path: Path) -> None:
    """A service manager that stops reading the notify socket (its queue holds 10 datagrams) must not stall
    kktd: watchdog pings every 50 ms fill the queue within a second, and kktd keeps answering."""
    import time

    kktd = KktdProcess(tmp_path / "buffer.db", env={"KKTD_LOG_LEVEL": "info"}, watchdog_usec=100_000)
    kktds.append(kktd)
    kktd.start()  # READY read; nothing is read from the socket after this
    deadline = time.monotonic() + 3.0
    round_number = 0
    while time.monotonic() < deadline:
        answers = asyncio.run(post_many(kktd.url, receipts(f"notify-{round_number}", 2)))
        assert [answer.status for answer in answers] == [201, 201]
        round_number += 1
    wait_until(lambda: "the notify socket is full" in kktd.log(), 10, "the dropped-notification warning")
    assert kktd.log().count("the notify socket is full") == 1
    kktd.signal(signal.SIGTERM)
    assert kktd.wait() == 0


def _status_lines_reach(kktd: KktdProcess, name: str, count: int) -> bool:
    return kktd.log().count(f"received {name}: not a stop signal") == count
