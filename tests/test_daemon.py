"""The daemon's supervision of its background tasks, in-process."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from kktd.daemon import Daemon
from kktd.sync.loop import SyncLoop
from tests.conftest import make_config


async def test_a_crashed_sync_loop_stops_kktd_for_systemd_to_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
