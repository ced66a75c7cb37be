"""Prepared buffer databases (N pending + M sent receipts), written through kktd's own storage code.

Receipts are generated like bench/receipts.lua generates them (2-5 items, Cyrillic names, matching
payments), validated by kktd.receipt.validate_receipt and stored with kktd.store.Store.accept (group
commit, exactly the path the HTTP intake takes minus HTTP); the sent ones are then acknowledged with
Store.settle, as the sync loop does after an OFD answer. The result is cached under bench/results/, keyed by
kktd's SCHEMA_VERSION, and never used directly: every run works on a copy.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kktd.delivery import FiscalData, Fiscalized
from kktd.receipt import validate_receipt
from kktd.store import SCHEMA_VERSION, Accepted, Store

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 512  # concurrent intakes in flight: one full group commit (kktd.store.writer.MAX_GROUP)
SETTLE_CHUNK = 5000

NAMES = (
    "Молоко 3,2% 1 л",
    "Хлеб бородинский",
    "Сыр российский 200 г",
    "Яйца С1 10 шт",
    "Кефир 1% 900 мл",
    "Масло сливочное 82,5%",
    "Гречка ядрица 900 г",
    "Сахар-песок 1 кг",
    "Чай чёрный листовой 100 г",
    "Кофе молотый 250 г",
    "Яблоки Голден, кг",
    "Бананы, кг",
    "Картофель молодой, кг",
    "Огурцы грунтовые, кг",
    "Колбаса докторская 400 г",
    "Пельмени сибирские 800 г",
    "Вода минеральная 1,5 л",
    "Сок яблочный 1 л",
    "Шоколад молочный 90 г",
    "Печенье овсяное 300 г",
    "Пакет-майка",
    "Зубная паста 100 мл",
    "Стиральный порошок 3 кг",
    "Сметана 20% 300 г",
)
QUANTITIES = (
    ("1.000", 1000),
    ("1.000", 1000),
    ("2.000", 2000),
    ("3.000", 3000),
    ("0.500", 500),
    ("1.250", 1250),
    ("0.356", 356),
    ("0.875", 875),
)
VATS = ("vat20", "vat20", "vat10", "none", "vat0")
TAXATIONS = ("osn", "osn", "usn_income", "usn_income_outcome", "patent")
CASHIERS = ("Иванова А. П.", "Петров С. Н.", "Сидоренко Ю. В.")


def receipt(key: str, rng: random.Random, contact: bool = False) -> dict[str, Any]:
    """One realistic receipt body, as a POS would post it (with the buyer's contact: ATOL Online needs one)."""
    items: list[dict[str, Any]] = []
    total = 0
    for _ in range(rng.randint(2, 5)):
        price = rng.randint(39, 4999) * 10
        text, milli = rng.choice(QUANTITIES)
        item_sum = (price * milli + 500) // 1000  # half-up to the kopeck, as the validator rounds
        total += item_sum
        items.append(
            {
                "name": rng.choice(NAMES),
                "price": price,
                "quantity": text,
                "sum": item_sum,
                "vat": rng.choice(VATS),
                "payment_method": "full_payment",
                "payment_object": "commodity",
            }
        )
    cash = total // 300 * 100 if total >= 300 and rng.randint(1, 3) == 1 else 0
    payments = [{"type": "cash", "amount": cash}] if cash else []
    payments.append({"type": "electronic", "amount": total - cash})
    body: dict[str, Any] = {
        "idempotency_key": key,
        "pos_id": f"POS-{rng.randint(1, 40):03d}",
        "operation": "sale",
        "taxation": rng.choice(TAXATIONS),
        "items": items,
        "payments": payments,
    }
    if rng.randint(1, 2) == 1:
        body["cashier"] = {"name": rng.choice(CASHIERS), "inn": "771234567890"}
    if contact:
        body["customer_contact"] = f"+7999{rng.randint(0, 9_999_999):07d}"
    return body


def cached_path(pending: int, sent: int, contact: bool = False) -> Path:
    return RESULTS / f"buffer-schema{SCHEMA_VERSION}-pending{pending}-sent{sent}{'-contact' if contact else ''}.db"


def ensure(pending: int, sent: int, contact: bool = False) -> tuple[Path, float | None]:
    """The cached database with these counts, built if missing; returns (path, seconds spent building).
    ``contact``: every receipt carries a customer contact (the ATOL Online drain)."""
    path = cached_path(pending, sent, contact)
    if path.exists():
        return path, None
    RESULTS.mkdir(parents=True, exist_ok=True)
    building = path.with_suffix(".building")
    for leftover in (building, Path(f"{building}-wal"), Path(f"{building}-shm")):
        leftover.unlink(missing_ok=True)
    started = time.monotonic()
    asyncio.run(_build(building, pending, sent, contact))
    _checkpoint(building)
    building.rename(path)
    return path, time.monotonic() - started


def copy_to(source: Path, target: Path) -> None:
    """A private copy of a cached database for one run (the cache stays pristine).

    The copy is fsynced before kktd sees it: otherwise kktd's first WAL checkpoint (which fsyncs the
    database file) would pay for writing back the whole freshly copied file, a stall that a real buffer
    never has (measured: ~365 ms for the 1,000,000-row file, at the 10th group commit)."""
    pairs = [(source, target)]
    wal = Path(f"{source}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        # Someone opened the cache and left committed pages in its WAL: they belong to the database.
        pairs.append((wal, Path(f"{target}-wal")))
    for src, dst in pairs:
        shutil.copyfile(src, dst)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def _build(path: Path, pending: int, sent: int, contact: bool = False) -> None:
    buffer = await Store.open(path, max_pending=pending + sent + 1)
    try:
        rng = random.Random(20261124)
        # The sent receipts are the older ones, as in a real buffer: insert and acknowledge them first.
        sent_ids = await _insert(buffer, rng, "sent", sent, contact)
        for start in range(0, len(sent_ids), SETTLE_CHUNK):
            await buffer.settle(
                [_ack(receipt_id, start + i) for i, receipt_id in enumerate(sent_ids[start : start + SETTLE_CHUNK])]
            )
        await _insert(buffer, rng, "pending", pending, contact)
        if (buffer.counts.pending, buffer.counts.sent) != (pending, sent):
            raise RuntimeError(f"prepared buffer holds {buffer.counts}, wanted pending={pending} sent={sent}")
    finally:
        await buffer.close()


async def _insert(buffer: Store, rng: random.Random, label: str, count: int, contact: bool = False) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, CHUNK):
        receipts = [
            validate_receipt(receipt(f"prep-{label}-{n}", rng, contact))
            for n in range(start, min(start + CHUNK, count))
        ]
        results = await asyncio.gather(*(buffer.accept(r) for r in receipts))
        for result in results:
            if not isinstance(result, Accepted) or not result.created:
                raise RuntimeError(f"preparing the buffer: intake answered {result!r}")
            ids.append(result.receipt_id)
    return ids


def _ack(receipt_id: str, number: int) -> Fiscalized:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return Fiscalized(
        receipt_id,
        FiscalData(
            fiscal_document_number=number + 1, fiscal_sign=f"{number * 7919 % 10**10:010d}", registered_at=stamp
        ),
    )


def _checkpoint(path: Path) -> None:
    """Fold the WAL into the main file so the cache is one self-contained file (copies skip -wal/-shm)."""
    conn = sqlite3.connect(path)
    try:
        # The file stays in WAL mode (persistent in its header), as kktd leaves it.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
