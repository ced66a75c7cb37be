"""The receipt queries: each a job the writer runs on its connection, returning typed rows.

Nothing here is called except through `Store.run` (kktd/store/writer.py), so no query ever runs inside
another job's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiosqlite

from kktd.delivery import AwaitingResult, FiscalData, Fiscalized, NotRegistered, Outgoing, Refused, Registered
from kktd.store.rows import Counts, ReceiptRow, ReceiptStatus, Registration
from kktd.store.schema import fetch_all, fetch_one, rollback

# Status literals in SQL come from the enum (inlined, not bound: SQLite uses a partial index only for a
# literal that matches its WHERE clause).
PENDING, SUBMITTED, SENT, FAILED, RESOLVED = (
    status.value
    for status in (
        ReceiptStatus.PENDING,
        ReceiptStatus.SUBMITTED,
        ReceiptStatus.SENT,
        ReceiptStatus.FAILED,
        ReceiptStatus.RESOLVED,
    )
)
SQL_PARAM_CHUNK = 500  # stays well under SQLite's bound-parameter limit

_ROW_COLUMNS = (
    "receipt_id, idempotency_key, body, total, status, attempts, last_error, accepted_ms, updated_ms, "
    "sent_ms, fiscal_document_number, fiscal_sign, ofd_received_at, fn_number, shift_number, receipt_number, "
    "kkt_registration_number, ofd_receipt_url, fns_url, ofd_inn, external_id, registrations, upstream_ref, "
    "submitted_ms, seq, resolution"
)
# A receipt is registered under its idempotency key until the upstream says a document was not registered;
# then under this derived id ('~' never occurs in a key, so it can never be another receipt's key).
REREGISTRATION_SEPARATOR = "~"


def _receipt_row(row: Sequence[Any]) -> ReceiptRow:
    (
        receipt_id,
        key,
        body,
        total,
        status,
        attempts,
        last_error,
        accepted_ms,
        updated_ms,
        sent_ms,
        fdn,
        sign,
        received,
        fn_number,
        shift,
        receipt_number,
        kkt_number,
        receipt_url,
        fns_url,
        ofd_inn,
        external_id,
        registrations,
        reference,
        submitted_ms,
        seq,
        resolution,
    ) = row
    fiscal = None
    if status == ReceiptStatus.SENT:
        fiscal = FiscalData(
            fdn, sign, received, fn_number, shift, receipt_number, kkt_number, receipt_url, fns_url, ofd_inn
        )
    registration = Registration(external_id or key, registrations, reference, submitted_ms)
    return ReceiptRow(
        receipt_id,
        key,
        body,
        total,
        ReceiptStatus(status),
        attempts,
        last_error,
        accepted_ms,
        updated_ms,
        fiscal,
        sent_ms,
        registration,
        seq,
        resolution,
    )


async def ping(conn: aiosqlite.Connection) -> None:
    """A round trip through the database: proves the connection (and its thread) is not wedged."""
    await fetch_one(conn, "SELECT 1")


async def count_by_status(conn: aiosqlite.Connection) -> Counts:
    counts = Counts()
    for status in ReceiptStatus:
        # The partial indexes make these index-only counts (a literal, not a parameter: SQLite matches a
        # partial index only against a WHERE it can see).
        row = await fetch_one(conn, f"SELECT count(*) FROM receipts WHERE status = '{status.value}'")
        setattr(counts, status, row[0])
    return counts


async def receipt(conn: aiosqlite.Connection, receipt_id: str) -> ReceiptRow | None:
    row = await fetch_one(conn, f"SELECT {_ROW_COLUMNS} FROM receipts WHERE receipt_id = ?", (receipt_id,))
    return _receipt_row(row) if row is not None else None


async def receipt_by_key(conn: aiosqlite.Connection, idempotency_key: str) -> ReceiptRow | None:
    row = await fetch_one(conn, f"SELECT {_ROW_COLUMNS} FROM receipts WHERE idempotency_key = ?", (idempotency_key,))
    return _receipt_row(row) if row is not None else None


async def dead_letters(conn: aiosqlite.Connection, limit: int, after_seq: int) -> list[ReceiptRow]:
    rows = await fetch_all(
        conn,
        f"SELECT {_ROW_COLUMNS} FROM receipts WHERE status = '{FAILED}' AND seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    )
    return [_receipt_row(row) for row in rows]


async def accepted_between(
    conn: aiosqlite.Connection, since_ms: int, until_ms: int | None, after_id: str | None, limit: int
) -> list[ReceiptRow]:
    """Receipts accepted in [since_ms, until_ms), in id order, after `after_id` (keyset paging). A receipt
    id starts with its acceptance time in milliseconds as 12 hex digits (writer.new_receipt_ids), so the
    range is a scan of the receipt_id index, never of the table; accepted_ms is checked as well."""
    low = after_id if after_id is not None else f"{since_ms:012x}"
    high = f"{until_ms:012x}" if until_ms is not None else "g"  # "g" sorts after every hex digit
    rows = await fetch_all(
        conn,
        f"SELECT {_ROW_COLUMNS} FROM receipts WHERE receipt_id > ? AND receipt_id < ? "
        f"AND accepted_ms >= ? AND accepted_ms < ? ORDER BY receipt_id LIMIT ?",
        (low, high, since_ms, until_ms if until_ms is not None else 2**62, limit),
    )
    return [_receipt_row(row) for row in rows]


async def oldest_unsent_ms(conn: aiosqlite.Connection) -> int | None:
    """When the oldest receipt not fiscalized yet (pending or submitted) was accepted."""
    oldest: list[int] = []
    for status in (ReceiptStatus.PENDING, ReceiptStatus.SUBMITTED):
        row = await fetch_one(
            conn, f"SELECT accepted_ms FROM receipts WHERE status = '{status.value}' ORDER BY seq LIMIT 1"
        )
        if row is not None:
            oldest.append(row[0])
    return min(oldest) if oldest else None


async def pending_batch(
    conn: aiosqlite.Connection, limit: int, after_seq: int, exclude: Sequence[str]
) -> list[Outgoing]:
    """The oldest pending receipts after `after_seq`, skipping `exclude` (receipts held back by the loop)."""
    sql = (
        "SELECT receipt_id, idempotency_key, coalesce(external_id, idempotency_key), accepted_ms, body, seq "
        f"FROM receipts WHERE status = '{PENDING}' AND seq > ?"
    )
    params: list[Any] = [after_seq]
    if exclude:
        sql += f" AND receipt_id NOT IN ({','.join('?' * len(exclude))})"
        params.extend(exclude)
    sql += " ORDER BY seq LIMIT ?"
    params.append(limit)
    return [Outgoing(*row) for row in await fetch_all(conn, sql, params)]


async def submitted_batch(conn: aiosqlite.Connection, limit: int, after_seq: int) -> list[AwaitingResult]:
    """The oldest receipts a two-phase upstream registered, after `after_seq`."""
    rows = await fetch_all(
        conn,
        "SELECT receipt_id, coalesce(external_id, idempotency_key), upstream_ref, seq FROM receipts "
        f"WHERE status = '{SUBMITTED}' AND seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    )
    return [AwaitingResult(*row) for row in rows]


async def existing_keys(conn: aiosqlite.Connection, keys: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """(receipt_id, body_hash, total, accepted_ms, status) of the receipts holding these idempotency keys."""
    found: dict[str, tuple[Any, ...]] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), SQL_PARAM_CHUNK):
        chunk = unique[start : start + SQL_PARAM_CHUNK]
        rows = await fetch_all(
            conn,
            f"SELECT idempotency_key, receipt_id, body_hash, total, accepted_ms, status FROM receipts "
            f"WHERE idempotency_key IN ({','.join('?' * len(chunk))})",
            chunk,
        )
        for key, receipt_id, body_hash, total, accepted_ms, status in rows:
            found[key] = (receipt_id, body_hash, total, accepted_ms, status)
    return found


async def insert_receipts(conn: aiosqlite.Connection, rows: list[tuple[Any, ...]]) -> set[str]:
    """One multi-row INSERT: in autocommit it is its own transaction, so the rows are committed (fsynced)
    before the statement returns, in a single round trip to the SQLite thread. Returns the ids inserted
    (a key that exists already inserts nothing)."""
    values = ",".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
    returned = await conn.execute_fetchall(
        "INSERT INTO receipts (receipt_id, idempotency_key, body_hash, body, pos_id, total, accepted_ms, "
        f"updated_ms) VALUES {values} ON CONFLICT (idempotency_key) DO NOTHING RETURNING receipt_id",
        [value for row in rows for value in row],
    )
    return {row[0] for row in returned}


async def mark_sent(
    conn: aiosqlite.Connection, stamp: int, source: ReceiptStatus, fiscalized: Sequence[Fiscalized]
) -> int:
    rows = [
        (
            f.receipt_id,
            f.fiscal.fiscal_document_number,
            f.fiscal.fiscal_sign,
            f.fiscal.registered_at,
            f.fiscal.fn_number,
            f.fiscal.shift_number,
            f.fiscal.receipt_number,
            f.fiscal.kkt_registration_number,
            f.fiscal.ofd_receipt_url,
            f.fiscal.fns_url,
            f.fiscal.ofd_inn,
        )
        for f in fiscalized
    ]
    return await _update_from_values(
        conn,
        f"status = '{SENT}', last_error = NULL, sent_ms = ?1, updated_ms = ?1, "
        "fiscal_document_number = v.column2, fiscal_sign = v.column3, ofd_received_at = v.column4, "
        "fn_number = v.column5, shift_number = v.column6, receipt_number = v.column7, "
        "kkt_registration_number = v.column8, ofd_receipt_url = v.column9, fns_url = v.column10, ofd_inn = v.column11",
        stamp,
        source,
        rows,
    )


async def mark_refused(
    conn: aiosqlite.Connection, stamp: int, source: ReceiptStatus, refused: Sequence[Refused]
) -> int:
    rows = [(r.receipt_id, f"{r.code}: {r.message}") for r in refused]
    return await _update_from_values(
        conn, f"status = '{FAILED}', last_error = v.column2, updated_ms = ?1", stamp, source, rows
    )


async def mark_submitted(conn: aiosqlite.Connection, stamp: int, registered: Sequence[Registered]) -> int:
    """The upstream took these documents: from now on they are only polled under their reference."""
    rows = [(r.receipt_id, r.reference) for r in registered]
    return await _update_from_values(
        conn,
        f"status = '{SUBMITTED}', upstream_ref = v.column2, submitted_ms = ?1, updated_ms = ?1, last_error = NULL",
        stamp,
        ReceiptStatus.PENDING,
        rows,
    )


async def mark_not_registered(conn: aiosqlite.Connection, stamp: int, failed: Sequence[NotRegistered]) -> int:
    """The upstream says these documents were not registered: back to pending under a new external id,
    committed before anything is sent again, so no retry can ever reuse the failed registration's id."""
    rows = [(f.receipt_id, f"{f.code}: {f.message}") for f in failed]
    return await _update_from_values(
        conn,
        f"status = '{PENDING}', registrations = registrations + 1, "
        f"external_id = idempotency_key || '{REREGISTRATION_SEPARATOR}' || (registrations + 1), "
        "upstream_ref = NULL, submitted_ms = NULL, last_error = v.column2, updated_ms = ?1",
        stamp,
        ReceiptStatus.SUBMITTED,
        rows,
    )


async def record_attempt_failure(
    conn: aiosqlite.Connection, stamp: int, receipt_ids: Sequence[str], reason: str, max_attempts: int, strike: bool
) -> list[str]:
    """Note a failed delivery of these receipts. With `strike` (the failure is the receipts' own), count it
    in `attempts` and move those past max_attempts to failed. Returns the ids dead-lettered."""
    marks = ",".join("?" * len(receipt_ids))
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute(
            f"UPDATE receipts SET attempts = attempts + ?, last_error = ?, updated_ms = ? "
            f"WHERE status = '{PENDING}' AND receipt_id IN ({marks})",
            (int(strike), reason, stamp, *receipt_ids),
        )
        moved: list[str] = []
        if strike:
            rows = await fetch_all(
                conn,
                f"SELECT receipt_id FROM receipts WHERE status = '{PENDING}' AND attempts > ? "
                f"AND receipt_id IN ({marks})",
                (max_attempts, *receipt_ids),
            )
            moved = [row[0] for row in rows]
            if moved:
                await conn.execute(
                    f"UPDATE receipts SET status = '{FAILED}', last_error = ? "
                    f"WHERE receipt_id IN ({','.join('?' * len(moved))})",
                    (f"gave up after {max_attempts} failed deliveries: {reason}", *moved),
                )
        await conn.execute("COMMIT")
    except BaseException:
        await rollback(conn)
        raise
    return moved


async def resolve(conn: aiosqlite.Connection, stamp: int, receipt_id: str, reason: str) -> int:
    """A dead letter closed by the operator: kept with its refusal (last_error) and the reason, never sent."""
    cursor = await conn.execute(
        f"UPDATE receipts SET status = '{RESOLVED}', resolution = ?, updated_ms = ? "
        f"WHERE receipt_id = ? AND status = '{FAILED}'",
        (reason, stamp, receipt_id),
    )
    return cursor.rowcount


async def requeue(conn: aiosqlite.Connection, stamp: int, receipt_id: str) -> int:
    """A dead letter back to pending. One that a two-phase upstream had registered (it has a reference) and
    then reported failed holds on to that failed document under its external id: submitting it again under
    the same id would only adopt the failed document again, so it goes out under a new one, as after
    NotRegistered."""
    cursor = await conn.execute(
        f"UPDATE receipts SET status = '{PENDING}', attempts = 0, updated_ms = ?, "
        "registrations = registrations + (upstream_ref IS NOT NULL), "
        "external_id = CASE WHEN upstream_ref IS NULL THEN external_id "
        f"ELSE idempotency_key || '{REREGISTRATION_SEPARATOR}' || (registrations + 1) END, "
        "upstream_ref = NULL, submitted_ms = NULL "
        f"WHERE receipt_id = ? AND status = '{FAILED}'",
        (stamp, receipt_id),
    )
    return cursor.rowcount


async def prune_sent(conn: aiosqlite.Connection, older_than_ms: int, limit: int) -> int:
    cursor = await conn.execute(
        f"DELETE FROM receipts WHERE seq IN (SELECT seq FROM receipts WHERE status = '{SENT}' "
        "AND sent_ms < ? ORDER BY sent_ms LIMIT ?)",
        (older_than_ms, limit),
    )
    return cursor.rowcount


async def _update_from_values(
    conn: aiosqlite.Connection, assignments: str, stamp: int, source: ReceiptStatus, rows: list[tuple[Any, ...]]
) -> int:
    """UPDATE receipts in status `source` from a VALUES list whose first column is the receipt_id; returns
    rows changed. One statement: one transaction, one round trip."""
    width = len(rows[0])
    placeholders = ",".join(["(" + ",".join(["?"] * width) + ")"] * len(rows))
    # ?1 is the timestamp; the VALUES placeholders are numbered after it.
    numbered = _number_placeholders(placeholders, start=2)
    cursor = await conn.execute(
        f"UPDATE receipts SET {assignments} FROM (VALUES {numbered}) AS v "
        f"WHERE receipts.receipt_id = v.column1 AND receipts.status = '{source.value}'",
        [stamp, *(value for row in rows for value in row)],
    )
    return cursor.rowcount


def _number_placeholders(text: str, start: int) -> str:
    parts = text.split("?")
    return "".join(f"{part}?{start + i}" if i < len(parts) - 1 else part for i, part in enumerate(parts))
