"""Reload (SIGHUP, `systemctl reload kktd`): what changes live, what needs a restart, an invalid file refused,
and a reload under load that loses nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kktd import reload
from tests.conftest import make_config
from tests.support import KktdProcess, MockOfdProcess, http, post_many, receipts, wait_until

# ---- the plan ----


def test_live_changes_and_restart_changes(tmp_path: Path) -> None:
    old = make_config(tmp_path)
    new = dataclasses.replace(
        make_config(
            tmp_path,
            ofd_url="http://ofd.example:9000",
            sync_interval=1.0,
            pending_warn_age=7200.0,
            log_level="debug",
            batch_size=10,
            listen_port=9999,
        )
    )
    plan = reload.plan(old, new)
    live = {c.key: (c.old, c.new) for c in plan.live}
    assert live["sync_interval"] == ("5", "1")
    assert live["pending_warn_age"] == ("259200", "7200")
    assert live["log_level"] == ("info", "debug")
    assert live["ofd_url"] == ("http://127.0.0.1:9000", "http://ofd.example:9000")
    assert plan.upstream_changed
    restart = {c.key: (c.old, c.new) for c in plan.needs_restart}
    assert restart == {"batch_size": ("50", "10"), "listen": ("127.0.0.1:8731", "127.0.0.1:9999")}
    # What needs a restart keeps its running value; the rest is the new configuration.
    assert plan.effective.batch_size == 50 and plan.effective.listen_port == 8731
    assert plan.effective.sync_interval == 1.0 and plan.effective.upstream_settings == new.upstream_settings


def test_credentials_are_never_shown(tmp_path: Path) -> None:
    old = make_config(tmp_path, ofd_url="https://kktd:old-secret@ofd.example")
    new = make_config(tmp_path, ofd_url="https://kktd:new-secret@ofd.example")
    plan = reload.plan(old, new)
    assert plan.upstream_changed
    assert "secret" not in repr(plan.live) and "secret" not in repr(plan.needs_restart)
    assert [c.key for c in plan.live] == ["kktd-ofd credentials"]


def test_nothing_changed(tmp_path: Path) -> None:
    plan = reload.plan(make_config(tmp_path), make_config(tmp_path))
    assert plan.unchanged and not plan.upstream_changed


def test_embedded_mock_keeps_its_upstream(tmp_path: Path) -> None:
    old = make_config(tmp_path, embedded_mock=True)
    new = make_config(tmp_path, embedded_mock=True, ofd_url="http://elsewhere:1")
    plan = reload.plan(old, new)
    assert not plan.upstream_changed and plan.effective.upstream_settings == old.upstream_settings
    assert [c.key for c in plan.needs_restart] == ["ofd_url"]


# ---- a running kktd ----


def metric(kktd: KktdProcess, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{kktd.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def sighup_and_wait(kktd: KktdProcess) -> list[str]:
    """SIGHUP, then the notify messages of the reload: RELOADING=1 ... READY=1."""
    assert kktd.notify is not None
    seen = len(kktd.notify.collect())
    kktd.signal(signal.SIGHUP)
    wait_until(lambda: "READY=1" in kktd.notify.collect()[seen:], 20, "READY=1 after the reload")  # type: ignore
    return kktd.notify.collect()[seen:]


def write_config(path: Path, **values: Any) -> None:
    path.write_text("".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in values.items()))


def test_reload_applies_live_settings_names_restart_ones_and_refuses_bad_files(
    tmp_path: Path, kktds: list[KktdProcess], ofd_process: MockOfdProcess
) -> None:
    config = tmp_path / "kktd.toml"
    write_config(
        config,
        ofd_url="http://127.0.0.1:9",
        pending_warn_age="1h",
        sync_interval="1h",
        batch_size=50,
        breaker_threshold=100,
    )
    kktd = KktdProcess(tmp_path / "buffer.db", ofd_url="", extra_args=["--config", str(config)])
    kktds.append(kktd)
    kktd.start()
    posted = asyncio.run(post_many(kktd.url, receipts("reload", 5)))
    assert [p.status for p in posted] == [201] * 5
    assert metric(kktd, "kktd_pending_warn_age_seconds") == 3600

    # The upstream moves to a reachable OFD; the alarm age and the interval change; batch_size cannot.
    write_config(
        config,
        ofd_url=ofd_process.url,
        pending_warn_age="2h",
        sync_interval="100ms",
        batch_size=10,
        breaker_threshold=100,
    )
    messages = sighup_and_wait(kktd)
    assert messages[0] == "RELOADING=1" and messages[1].startswith("MONOTONIC_USEC=")
    assert messages.index("READY=1") > messages.index("RELOADING=1")
    wait_until(lambda: "configuration reloaded: 3 applied, 1 need a restart" in kktd.log(), 10, "the summary")
    log = kktd.log()
    assert "reload: pending_warn_age: 3600 -> 7200" in log
    assert "reload: sync_interval: 3600 -> 0.1" in log
    assert f"reload: ofd_url: http://127.0.0.1:9 -> {ofd_process.url}" in log
    assert "reload: batch_size: 50 -> 10 needs a restart (systemctl restart kktd); still 50" in log
    assert metric(kktd, "kktd_pending_warn_age_seconds") == 7200
    # The new upstream delivers what was waiting, without a restart.
    wait_until(lambda: ofd_process.stats()["unique"] == 5, 30, "the receipts at the new OFD")

    # An invalid file is refused with the reason; the running configuration stays.
    config.write_text('pending_warn_age = "soon"\n')
    messages = sighup_and_wait(kktd)
    assert messages[0] == "RELOADING=1" and messages.index("READY=1") > 0
    wait_until(
        lambda: "reload refused, the running configuration stays: pending_warn_age" in kktd.log(), 10, "the refusal"
    )
    assert metric(kktd, "kktd_pending_warn_age_seconds") == 7200
    config.write_text("this is not toml [")
    sighup_and_wait(kktd)
    wait_until(lambda: "not valid TOML" in kktd.log(), 10, "the second refusal")
    status, health = http("GET", f"{kktd.url}/v1/health")
    assert status == 200 and health["status"] == "ok"
    assert kktd.proc is not None and kktd.proc.poll() is None


def test_reload_under_load_loses_nothing(tmp_path: Path, kktds: list[KktdProcess], ofd_process: MockOfdProcess) -> None:
    config = tmp_path / "kktd.toml"
    write_config(config, ofd_url=ofd_process.url, sync_interval="1s")
    kktd = KktdProcess(tmp_path / "buffer.db", ofd_url="", extra_args=["--config", str(config)])
    kktds.append(kktd)
    kktd.start()

    async def load_and_reload() -> list[Any]:
        loading = asyncio.create_task(post_many(kktd.url, receipts("hup", 1500), concurrency=16))
        for interval in ("200ms", "2s", "500ms"):
            write_config(config, ofd_url=ofd_process.url, sync_interval=interval)
            await asyncio.to_thread(sighup_and_wait, kktd)
        return await loading

    posted = asyncio.run(load_and_reload())
    assert len(posted) == 1500 and all(p.status == 201 for p in posted), {p.status for p in posted}
    assert kktd.log().count("configuration reloaded: 1 applied") == 3
    wait_until(lambda: ofd_process.stats()["unique"] == 1500, 60, "every receipt at the OFD")
    _, status = http("GET", f"{kktd.url}/v1/kkt/buffer/status")
    assert status["counts"] == {"pending": 0, "submitted": 0, "sent": 1500, "failed": 0, "resolved": 0}
    kktd.signal(signal.SIGTERM)
    assert kktd.wait() == 0
    assert os.path.exists(tmp_path / "buffer.db")


async def test_apply_changes_the_running_parts(app_factory: Any, tmp_path: Path) -> None:
    """Daemon._apply on an assembled kktd: log level, intervals, capacity and the upstream itself change;
    the replaced upstream is closed once no cycle runs."""
    import logging

    from kktd.daemon import Daemon

    app = await app_factory()
    daemon = Daemon(app.kktd.config)
    daemon.kktd = app.kktd
    old_upstream = app.kktd.sync.upstream
    new_config = make_config(
        tmp_path,
        log_level="debug",
        sync_interval=0.5,
        max_pending=77,
        pending_critical_age=86400.0,
        ofd_url="http://127.0.0.1:9",
    )
    root = logging.getLogger()
    level = root.level
    try:
        await daemon._apply(reload.plan(app.kktd.config, new_config))
        assert root.level == logging.DEBUG
        assert app.kktd.sync.config.sync_interval == 0.5 and app.services.config.pending_critical_age == 86400
        assert app.store.max_pending == 77
        assert app.kktd.sync.upstream is not old_upstream
        await asyncio.gather(*daemon.tasks.values())
        assert getattr(old_upstream, "_session", "gone") is None  # closed
    finally:
        root.setLevel(level)
