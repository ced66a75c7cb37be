"""kktd and the mock OFD for the power-cut proof (tests.support's process runners, with the database on the
cut filesystem and everything else off it), load clients and the ledger of what kktd acknowledged."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kktd.receipt import sample_receipt
from tests.support import KktdProcess, MockOfdProcess, http_async

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)


async def start_kktd(
    db: Path,
    log_dir: Path,
    ofd_url: str,
    extra_args: Sequence[str] = (),
    stoppers: list[Callable[[], None]] | None = None,
) -> KktdProcess:
    """kktd with its database on the power-cut filesystem and its log outside it (what it logged survives
    the cut); ready once it sent READY=1 and its health answers 200. Its stop is registered with `stoppers`
    before it starts, so a failed start is cleaned up too."""
    kktd = KktdProcess(db=db, ofd_url=ofd_url, extra_args=extra_args, log_dir=log_dir, log_level="info")
    if stoppers is not None:
        stoppers.append(kktd.stop)

    def start() -> None:
        kktd.start(timeout=30)
        kktd.wait_healthy(timeout=30)

    await asyncio.to_thread(start)
    return kktd


async def start_mock_ofd(db: Path, log_dir: Path, stoppers: list[Callable[[], None]]) -> MockOfdProcess:
    """The mock OFD with its store outside the power-cut filesystem (what it acknowledged is never cut)."""
    ofd = MockOfdProcess(workdir=log_dir, db=db, seed=None)
    stoppers.append(ofd.stop)
    await asyncio.to_thread(ofd.start, 30)
    return ofd


@dataclass
class Ledger:
    """What the POS side knows: every key it posted, which got a 2xx (and with which receipt_id)."""

    acked: dict[str, str] = field(default_factory=dict)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_doubt: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    cycle_acked: list[str] = field(default_factory=list)

    def new_receipt(self, key: str, client: int) -> dict[str, Any]:
        body = sample_receipt(key, pos_id=f"POS-{client:03d}")
        self.bodies[key] = body
        self.in_doubt.add(key)
        return body

    def answered(self, key: str, status: int, body: Any) -> bool:
        """Record an answer; True when it was a 2xx acknowledgement."""
        if status not in (200, 201):
            return False
        receipt_id = body["receipt_id"]
        known = self.acked.get(key)
        if known is not None and known != receipt_id:
            self.violations.append(f"key {key} acknowledged as {known} and later as {receipt_id}")
        if known is not None and status == 201:
            self.violations.append(f"key {key} was acknowledged before, yet a repost created it anew")
        if known is None:
            self.acked[key] = receipt_id
            self.cycle_acked.append(key)
        self.in_doubt.discard(key)
        return True


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await http_async("POST", f"{url}/v1/kkt/receipt", body, session=session)


async def load(
    session: aiohttp.ClientSession, url: str, ledger: Ledger, prefix: str, clients: int, stop: asyncio.Event
) -> None:
    """`clients` POS clients posting new receipts back to back until told to stop or kktd dies."""

    async def client(number: int) -> None:
        sequence = 0
        while not stop.is_set():
            key = f"{prefix}-c{number}-{sequence}"
            sequence += 1
            body = ledger.new_receipt(key, number)
            try:
                status, answer = await post(session, url, body)
            except (TimeoutError, aiohttp.ClientError, ValueError):
                return  # kktd is gone: the power is off
            if not ledger.answered(key, status, answer):
                return  # storage errors after the cut; the key stays in doubt

    await asyncio.gather(*(client(n) for n in range(clients)))


async def resolve_in_doubt(session: aiohttp.ClientSession, url: str, ledger: Ledger) -> int:
    """Retry every unanswered key with the same body, as a POS would: each must now be acknowledged."""
    keys = sorted(ledger.in_doubt)
    for key in keys:
        status, answer = await post(session, url, ledger.bodies[key])
        if not ledger.answered(key, status, answer):
            ledger.violations.append(f"retry of in-doubt key {key} answered {status}: {answer}")
    return len(keys)


async def replay_acked(session: aiohttp.ClientSession, url: str, ledger: Ledger, keys: Sequence[str]) -> None:
    """A replay of an acknowledged key must answer 200 with the same receipt_id, across cuts too."""
    for key in keys:
        status, answer = await post(session, url, ledger.bodies[key])
        if status != 200 or answer.get("receipt_id") != ledger.acked[key]:
            ledger.violations.append(f"replay of {key} answered {status} {answer}, expected 200 {ledger.acked[key]}")


async def missing_via_api(session: aiohttp.ClientSession, url: str, ledger: Ledger, keys: Sequence[str]) -> list[str]:
    missing = []
    for key in keys:
        status, body = await http_async("GET", f"{url}/v1/kkt/receipt/{ledger.acked[key]}", session=session)
        if status != 200 or body.get("idempotency_key") != key:
            missing.append(key)
    return missing


@dataclass
class ImageCheck:
    integrity: str
    rows: int
    missing: list[str]


def check_image(image: Path, scratch: Path, acked: dict[str, str]) -> ImageCheck:
    """Open a copy of the post-crash image with plain sqlite3 (the copy keeps the image untouched for
    kktd's own recovery): integrity, and every acknowledged receipt present with its receipt_id."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for name in ("buffer.db", "buffer.db-wal", "buffer.db-journal"):
        if (image / name).exists():
            shutil.copyfile(image / name, scratch / name)
    if not (scratch / "buffer.db").exists():
        return ImageCheck("buffer.db missing", 0, sorted(acked))
    try:
        conn = sqlite3.connect(scratch / "buffer.db")
        try:
            integrity = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
            stored = dict(conn.execute("SELECT idempotency_key, receipt_id FROM receipts").fetchall())
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return ImageCheck(f"unreadable: {exc}", 0, sorted(acked))
    missing = sorted(key for key, receipt_id in acked.items() if stored.get(key) != receipt_id)
    return ImageCheck(integrity, len(stored), missing)


async def buffer_counts(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    status, body = await http_async("GET", f"{url}/v1/kkt/buffer/status", session=session)
    assert status == 200, body
    return dict(body["counts"])
