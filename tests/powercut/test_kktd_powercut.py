"""The proof: kktd on the power-cut filesystem never loses an acknowledged receipt, and after the cuts
every receipt reaches the OFD exactly once.

One chain of cycles on one disk: start kktd on the current disk (OFD offline), check what survived,
retry the unanswered posts, let 8 clients post, cut the power at a seeded moment, SIGKILL kktd,
unmount, mount the post-crash image as the next disk. Cycles alternate `clean` and `torn` cuts with
different seeds. Finally the mock OFD comes up and kktd delivers, with one more cut in the middle of
the delivery. KKTD_POWERCUT_CYCLES sets the number of cycles (`make powercut` runs 200).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import KKTD_BIN, KktdProcess, async_wait_until, child_env

from .harness import PowerCutLab, report
from .kktd_helpers import (
    CLIENT_TIMEOUT,
    Ledger,
    buffer_counts,
    check_image,
    load,
    missing_via_api,
    replay_acked,
    resolve_in_doubt,
    start_kktd,
    start_mock_ofd,
)

pytestmark = [pytest.mark.powercut, pytest.mark.slow]

CYCLES = int(os.environ.get("KKTD_POWERCUT_CYCLES", "20"))
BASE_SEED = int(os.environ.get("KKTD_POWERCUT_SEED", "20261124"))
CLIENTS = 8
UNREACHABLE_OFD = "http://127.0.0.1:9"  # the discard port: nothing listens, the OFD is offline


@dataclass
class Figures:
    cycles: int = 0
    modes: dict[str, int] = field(default_factory=lambda: {"clean": 0, "torn": 0})
    lost: int = 0
    integrity_failures: int = 0
    in_doubt_retried: int = 0
    # What the cuts destroyed: unsynced writes pending at the cut, and the sectors torn cuts dropped.
    pending_writes_cut: int = 0
    sectors_dropped: int = 0
    problems: list[str] = field(default_factory=list)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as client_session:
        yield client_session


@pytest.fixture
def processes() -> Iterator[list[Callable[[], None]]]:
    """Stop functions of every child started; run even when the test fails (and before the
    lab fixture unmounts, since fixtures are torn down in reverse order)."""
    stoppers: list[Callable[[], None]] = []
    try:
        yield stoppers
    finally:
        for stop in reversed(stoppers):
            stop()


async def check_after_restart(
    session: aiohttp.ClientSession, kktd: KktdProcess, ledger: Ledger, rng: random.Random, figures: Figures, label: str
) -> None:
    """Through kktd's own recovery: last cycle's acknowledgements plus a sample of older ones are there
    and replay with their receipt_id; then the unanswered posts are retried."""
    recent = list(ledger.cycle_acked)
    recent_keys = set(recent)
    older = [key for key in ledger.acked if key not in recent_keys]
    sample = recent + rng.sample(older, min(len(older), 30))
    missing = await missing_via_api(session, kktd.url, ledger, sample)
    if missing:
        figures.problems.append(f"{label}: kktd does not return acknowledged receipts {missing[:5]}")
    await replay_acked(session, kktd.url, ledger, rng.sample(sample, min(len(sample), 10)))
    figures.in_doubt_retried += await resolve_in_doubt(session, kktd.url, ledger)
    ledger.cycle_acked.clear()


async def cut_under_load(
    lab: PowerCutLab,
    session: aiohttp.ClientSession,
    kktd: KktdProcess,
    ledger: Ledger,
    cycle: int,
    mode: str,
    seed: int,
    figures: Figures,
    scratch: Path,
) -> None:
    rng = random.Random(seed)
    target = rng.randint(5, 60)
    stop = asyncio.Event()
    clients = asyncio.create_task(load(session, kktd.url, ledger, f"k{cycle}", CLIENTS, stop))
    try:
        await async_wait_until(
            lambda: len(ledger.cycle_acked) >= target or clients.done(),
            60,
            f"{target} acknowledgements in cycle {cycle}",
            interval=0.01,
        )
        assert not clients.done(), f"clients stopped before the cut in cycle {cycle}"
        # The cut lands while the clients are in flight; kktd dies right after, before the unmount.
        cut = await asyncio.to_thread(lab.cut, mode, seed, kktd.kill)
        figures.pending_writes_cut += cut["pending_writes"]
        figures.sectors_dropped += cut["sectors_dropped"]
    finally:
        stop.set()
        kktd.kill()
        await asyncio.wait_for(clients, 30)
    assert lab.last_image is not None
    result = await asyncio.to_thread(check_image, lab.last_image, scratch, ledger.acked)
    figures.cycles += 1
    figures.modes[mode] += 1
    if result.integrity != "ok":
        figures.integrity_failures += 1
        figures.problems.append(f"cycle {cycle} ({mode}, seed {seed}): integrity {result.integrity}")
    if result.missing:
        figures.lost += len(result.missing)
        figures.problems.append(f"cycle {cycle} ({mode}, seed {seed}): lost {result.missing[:5]}")


@dataclass
class Delivery:
    counts: dict[str, int]
    stats: dict[str, Any]
    stored: dict[str, str]
    sent_before_cut: int


async def deliver_across_a_cut(
    lab: PowerCutLab,
    http: aiohttp.ClientSession,
    processes: list[Callable[[], None]],
    ledger: Ledger,
    figures: Figures,
    rng: random.Random,
    tmp_path: Path,
) -> Delivery:
    """The OFD comes up (its store is outside the cut filesystem) and kktd forwards everything; one more
    cut lands in the middle of it, so some "sent" marks are lost and must be re-sent harmlessly."""
    logs, db = tmp_path / "logs", lab.mountpoint / "buffer.db"
    ofd = await start_mock_ofd(tmp_path / "ofd.db", logs, processes)
    delivery_args = ("--sync-interval", "0.05", "--batch-size", "5", "--backoff-max", "0.2")
    kktd = await start_kktd(db, logs, ofd.url, delivery_args, processes)
    await check_after_restart(http, kktd, ledger, rng, figures, "delivery start")
    sent_before_cut = await wait_for_sent(http, kktd, max(1, len(ledger.acked) // 3), "a third delivered")
    await asyncio.to_thread(lab.cut, "torn", BASE_SEED + CYCLES, kktd.kill)
    assert lab.last_image is not None
    result = await asyncio.to_thread(check_image, lab.last_image, tmp_path / "check", ledger.acked)
    figures.lost += len(result.missing)
    if result.integrity != "ok":
        figures.integrity_failures += 1
        figures.problems.append(f"delivery cut: integrity {result.integrity}")
    # kktd's own verdict on the same post-crash database (the copy check_image recovered).
    check_db = await asyncio.to_thread(
        subprocess.run,
        [str(KKTD_BIN), "check-db", str(tmp_path / "check" / "buffer.db")],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    if check_db.returncode != 0:
        figures.integrity_failures += 1
        figures.problems.append(f"kktd check-db after the delivery cut: {check_db.returncode} {check_db.stderr}")
    await asyncio.to_thread(lab.mount, lab.last_image)
    kktd = await start_kktd(db, logs, ofd.url, delivery_args, processes)
    await check_after_restart(http, kktd, ledger, rng, figures, "after delivery cut")
    counts = await wait_for_delivery(http, kktd)
    return Delivery(
        counts, await asyncio.to_thread(ofd.stats), await asyncio.to_thread(ofd.stored_keys), sent_before_cut["sent"]
    )


async def test_kktd_survives_power_cuts_and_delivers_exactly_once(
    lab: PowerCutLab, http: aiohttp.ClientSession, processes: list[Callable[[], None]], tmp_path: Path
) -> None:
    assert CYCLES >= 2, "KKTD_POWERCUT_CYCLES must allow both a clean and a torn cut"
    started = time.monotonic()
    logs = tmp_path / "logs"
    logs.mkdir()
    ledger, figures, rng = Ledger(), Figures(), random.Random(BASE_SEED)
    await asyncio.to_thread(lab.mount)
    db = lab.mountpoint / "buffer.db"
    try:
        for cycle in range(CYCLES):
            mode, seed = ("clean", "torn")[cycle % 2], BASE_SEED + cycle
            kktd = await start_kktd(db, logs, UNREACHABLE_OFD, stoppers=processes)
            await check_after_restart(http, kktd, ledger, rng, figures, f"cycle {cycle} start")
            await cut_under_load(lab, http, kktd, ledger, cycle, mode, seed, figures, tmp_path / "check")
            await asyncio.to_thread(lab.mount, lab.last_image)
        delivery = await deliver_across_a_cut(lab, http, processes, ledger, figures, rng, tmp_path)
    finally:
        # The figures so far are worth seeing when a cycle fails too.
        report(
            f"kktd power-cut: cycles={figures.cycles} (clean={figures.modes['clean']} "
            f"torn={figures.modes['torn']}, +1 torn cut during delivery) "
            f"receipts acknowledged={len(ledger.acked)} lost={figures.lost} "
            f"integrity failures={figures.integrity_failures} "
            f"in-doubt retried={figures.in_doubt_retried} "
            f"(unsynced writes at the cuts={figures.pending_writes_cut}, "
            f"sectors dropped by torn cuts={figures.sectors_dropped}) "
            f"in {time.monotonic() - started:.0f}s"
        )

    counts, stats, stored = delivery.counts, delivery.stats, delivery.stored
    missing_at_ofd = sorted(k for k, rid in ledger.acked.items() if stored.get(k) != rid)
    unexpected_at_ofd = sorted(set(stored) - set(ledger.acked))
    report(
        f"kktd exactly-once: OFD unique={stats['unique']} kktd sent={counts['sent']} "
        f"failed={counts['failed']} missing at OFD={len(missing_at_ofd)} "
        f"unknown at OFD={len(unexpected_at_ofd)} redeliveries={stats.get('redeliveries')} "
        f"(sent before the delivery cut: {delivery.sent_before_cut})"
    )

    assert figures.problems == [], figures.problems[:10]
    assert ledger.violations == [], ledger.violations[:10]
    assert figures.lost == 0 and figures.integrity_failures == 0
    assert ledger.in_doubt == set()
    assert counts == {"pending": 0, "submitted": 0, "sent": len(ledger.acked), "failed": 0, "resolved": 0}
    assert stats["unique"] == len(ledger.acked), "the OFD stored a receipt twice or missed one"
    assert missing_at_ofd == [] and unexpected_at_ofd == []


async def wait_for_sent(session: aiohttp.ClientSession, kktd: KktdProcess, at_least: int, what: str) -> dict[str, int]:
    deadline = time.monotonic() + 90
    while True:
        counts = await buffer_counts(session, kktd.url)
        if counts["sent"] >= at_least:
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {counts}\n{kktd.log_tail()}")
        await asyncio.sleep(0.02)


async def wait_for_delivery(session: aiohttp.ClientSession, kktd: KktdProcess) -> dict[str, int]:
    """Until nothing is pending; rejected (failed) receipts end the wait too and fail the asserts."""
    deadline = time.monotonic() + 120
    while True:
        counts = await buffer_counts(session, kktd.url)
        if counts["pending"] == 0:
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"kktd did not deliver everything: {counts}\n{kktd.log_tail()}")
        await asyncio.sleep(0.02)


async def test_control_kktd_on_a_disk_that_ignores_fsync_loses_receipts(
    lab: PowerCutLab, http: aiohttp.ClientSession, processes: list[Callable[[], None]], tmp_path: Path
) -> None:
    """Negative control of the proof's own checks: the same cycle on a disk that acknowledges fsync
    without doing it must report lost receipts (and only those acknowledged on that disk)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    ledger, figures, rng = Ledger(), Figures(), random.Random(BASE_SEED)
    await asyncio.to_thread(lab.mount)
    db = lab.mountpoint / "buffer.db"
    kktd = await start_kktd(db, logs, UNREACHABLE_OFD, stoppers=processes)
    await cut_under_load(lab, http, kktd, ledger, 0, "clean", BASE_SEED, figures, tmp_path / "check")
    assert figures.problems == [] and figures.lost == 0, "an honest disk lost receipts"

    mount = await asyncio.to_thread(lab.mount, lab.last_image)
    await asyncio.to_thread(mount.ignore_fsync, True)
    acked_on_honest_disk = set(ledger.acked)
    kktd = await start_kktd(db, logs, UNREACHABLE_OFD, stoppers=processes)
    await check_after_restart(http, kktd, ledger, rng, figures, "lying disk start")
    await cut_under_load(lab, http, kktd, ledger, 1, "clean", BASE_SEED + 1, figures, tmp_path / "check")
    assert lab.last_image is not None
    result = await asyncio.to_thread(check_image, lab.last_image, tmp_path / "check", ledger.acked)
    acked_on_lying_disk = set(ledger.acked) - acked_on_honest_disk
    report(
        f"control kktd on a disk ignoring fsync: acknowledged={len(acked_on_lying_disk)} "
        f"lost={len(result.missing)} "
        f"(honest disk before it: acknowledged={len(acked_on_honest_disk)} lost=0)"
    )
    assert result.missing, "the proof's checks did not notice a disk that ignores fsync"
    assert set(result.missing) <= acked_on_lying_disk
