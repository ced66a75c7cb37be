"""The daemon's supervision of its background tasks, in-process."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest

from kktd.daemon import Daemon
from kktd.sync.loop import SyncLoop
from tests.conftest import make_config


async def test_a_crashed_sync_loop_stops_kktd_for_systemd_to_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kktd must not go on taking receipts it would never forward: the crash is logged, shown in health
    until the stop, and ends the daemon with an error (exit 70 via the CLI, then Restart=on-failure)."""

    async def crash(self: SyncLoop) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(SyncLoop, "run", crash)
    config = dataclasses.replace(make_config(tmp_path), listen_port=0)
    daemon = Daemon(config)
    with pytest.raises(RuntimeError, match="background task sync crashed"):
        await daemon.run()
    assert daemon.kktd is not None
    assert "sync" in daemon.kktd.services.task_failures


async def test_the_heap_start_up_built_is_frozen_before_ready(tmp_path: Path) -> None:
    """Start-up's objects (modules, the app) live as long as the process; left to the garbage collector, the
    first full collection walks them a few hundred milliseconds into the first load while every till waits
    (13 ms measured, the worst latency of the first second). They are out of its reach before READY=1."""
    config = dataclasses.replace(make_config(tmp_path), listen_port=0)
    daemon = Daemon(config)
    frozen_at_ready: list[int] = []

    def send(message: str) -> None:
        if message.startswith("READY=1"):
            frozen_at_ready.append(gc.get_freeze_count())
            daemon.stop_requested.set()

    daemon.notifier.send = send  # type: ignore[method-assign]
    try:
        assert await daemon.run() == 0
    finally:
        gc.unfreeze()  # the rest of the test session's heap is not a daemon's
    assert frozen_at_ready and frozen_at_ready[0] > 10_000
