"""A mock OFD (fiscal data operator) speaking the wire protocol of docs/contract.md.

Used by `make run` (embedded), by the tests and by integrators: ``kktd mock-ofd --listen 127.0.0.1:9000``.

Two listeners:

* the main listener (``--listen``) serves ``POST /v1/receipts`` and, for convenience, the admin routes;
* the admin listener (``--admin-listen``, default: the main port + 1) serves only the admin routes. It stays
  up in every mode, because ``offline`` really closes the main listening socket (clients get "connection
  refused") and the mock must still be told to come back online. Coming back re-binds the same port.

Admin routes: ``POST /admin/mode``, ``POST /admin/reject``, ``POST /admin/reset``, ``GET /admin/stats``,
``GET /admin/receipts`` (``?after=<fiscal document number>&limit=<n>``), ``GET /admin/receipts/{receipt_id}``.

Modes (``POST /admin/mode {"mode": ..., "delay_s": s, "fail_ratio": r, "seed": n}``):

* ``online``;
* ``offline``: main listener closed, pooled connections dropped;
* ``error500``: every batch answered 500, nothing stored;
* ``slow``: waits delay_s, then stores and answers;
* ``flaky``: a fail_ratio of batches fail, half with 500, half with a TCP reset (``seed`` or ``--seed`` makes
  the sequence reproducible);
* ``drop_ack``: stores, then resets the connection instead of answering (the lost acknowledgement).

Per-receipt rejection codes: ``invalid_receipt`` (a field missing or mistyped), ``total_mismatch`` (items do
not add up to the total), ``payment_total_mismatch``, ``kkt_not_registered`` (pos_id on the reject list) and
``idempotency_key_reused`` (a key already acknowledged for another receipt_id). A key acknowledged before is
acknowledged again with the very same values, and counted as a redelivery, before any other check.

The store is in memory, or a SQLite file with ``--db`` (WAL, synchronous=FULL, committed before answering)
so that what the mock acknowledged survives the restart of either side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import random
import re
import secrets
import signal
import socket
import sqlite3
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

from aiohttp import web

from kktd.upstreams import EmbeddedMock
from kktd.upstreams.kktd_ofd import KktdOfdSettings
from kktd_mocks.server import parse_listen

__all__ = [
    "MODES",
    "MockOfd",
    "MockOfdState",
    "create_app",
    "main",
    "parse_listen",
    "run",
    "start_mock_ofd",
]

log = logging.getLogger("kktd_mocks.ofd")

MODES = ("online", "offline", "error500", "slow", "flaky", "drop_ack")
MAX_BATCH = 100
# 100 receipts of up to 100 items each stay far below this.
MAX_REQUEST_BYTES = 16 << 20
COUNTERS = (
    "received",
    "redeliveries",
    "rejected",
    "requests",
    "bad_requests",
    "failed_requests",
    "dropped_acks",
)

SHUTDOWN_TIMEOUT_S = 1.0
EX_OK, EX_CONFIG, EX_IOERR = 0, 78, 74

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

ListenerHook = Callable[[str, str], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Mode:
    name: str = "online"
    delay_s: float = 0.0
    fail_ratio: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.name, "delay_s": self.delay_s, "fail_ratio": self.fail_ratio}


MOCK_FN_NUMBER = "9999078900004312"
MOCK_KKT_REGISTRATION_NUMBER = "0000000001002292"


@dataclass(slots=True)
class StoredReceipt:
    """An acknowledged receipt. The item is kept as the UTF-8 JSON text it arrived in and parsed only when
    someone looks at it: a parsed receipt costs about 3 KiB of objects, its text a quarter of that."""

    receipt_id: str
    idempotency_key: str
    fiscal_document_number: int
    fiscal_sign: str
    ofd_received_at: str
    item_json: bytes
    deliveries: int = 1

    @property
    def ack(self) -> dict[str, Any]:
        return {
            "receipt_id": self.receipt_id,
            "fiscal_document_number": self.fiscal_document_number,
            "fiscal_sign": self.fiscal_sign,
            "ofd_received_at": self.ofd_received_at,
            # The mock's one register (made-up numbers of the real form): enough for a POS to print a QR code.
            "fn_number": MOCK_FN_NUMBER,
            "kkt_registration_number": MOCK_KKT_REGISTRATION_NUMBER,
            "shift_number": 1,
            "receipt_number": self.fiscal_document_number,
        }

    def as_dict(self) -> dict[str, Any]:
        item = json.loads(self.item_json)
        return {
            "receipt_id": self.receipt_id,
            "idempotency_key": self.idempotency_key,
            "accepted_at": item["accepted_at"],
            "receipt": item["receipt"],
            "ack": self.ack,
            "deliveries": self.deliveries,
        }


@dataclass(slots=True)
class _Batch:
    """What one request changes, applied to the state only once it is durable."""

    received_at: str
    new: dict[str, StoredReceipt] = field(default_factory=dict)
    redelivered: dict[str, StoredReceipt] = field(default_factory=dict)
    redeliveries: int = 0
    rejected: int = 0


class BadRequest(Exception):
    """The whole request is unusable (answered 400)."""


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_rfc3339(value: object) -> bool:
    if not isinstance(value, str) or len(value) < 11 or value[10] not in "Tt":
        return False
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _is_kopecks(value: object) -> bool:
    return type(value) is int and value >= 0


def _sum_field(rows: object, name: str) -> int | None:
    """Sum of an integer field over a non-empty list of objects; None if anything is malformed."""
    if not isinstance(rows, list) or not rows:
        return None
    total = 0
    for row in rows:
        value = row.get(name) if type(row) is dict else None
        if type(value) is not int or value < 0:
            return None
        total += value
    return total


def check_item(item: object, rejected_pos_ids: frozenset[str]) -> tuple[str, str] | None:
    """The mock's own checks of one receipt: None if fine, else (code, message).

    Deliberately independent of kktd.receipt: the mock must catch what kktd's validation lets through.
    """
    if not isinstance(item, dict):
        return "invalid_receipt", "receipt entry must be an object"
    for name in ("receipt_id", "idempotency_key"):
        value = item.get(name)
        if not isinstance(value, str) or not value or len(value) > 128:
            return "invalid_receipt", f"{name} must be a non-empty string"
    if not _is_rfc3339(item.get("accepted_at")):
        return "invalid_receipt", "accepted_at must be an RFC 3339 timestamp"
    receipt = item.get("receipt")
    if not isinstance(receipt, dict):
        return "invalid_receipt", "receipt must be an object"
    pos_id = receipt.get("pos_id")
    if not isinstance(pos_id, str) or not pos_id:
        return "invalid_receipt", "receipt.pos_id must be a non-empty string"
    total = receipt.get("total")
    if not _is_kopecks(total):
        return "invalid_receipt", "receipt.total must be a non-negative integer (kopecks)"
    items_sum = _sum_field(receipt.get("items"), "sum")
    if items_sum is None:
        return "invalid_receipt", "receipt.items must be a non-empty list of objects with an integer sum"
    if items_sum != total:
        return "total_mismatch", f"items add up to {items_sum}, total is {total}"
    paid = _sum_field(receipt.get("payments"), "amount")
    if paid is None:
        return "invalid_receipt", ("receipt.payments must be a non-empty list of objects with an integer amount")
    if paid != total:
        return "payment_total_mismatch", f"payments add up to {paid}, total is {total}"
    if pos_id in rejected_pos_ids:
        return "kkt_not_registered", f"cash register {pos_id} is not registered with this OFD"
    return None


class SqliteStore:
    """Durable copy of the mock's acknowledgements and counters (the in-memory view is rebuilt from it)."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS receipts (
                    idempotency_key TEXT PRIMARY KEY,
                    receipt_id TEXT NOT NULL,
                    fiscal_document_number INTEGER NOT NULL UNIQUE,
                    fiscal_sign TEXT NOT NULL,
                    ofd_received_at TEXT NOT NULL,
                    item TEXT NOT NULL,
                    deliveries INTEGER NOT NULL
                );
                CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
                """
            )
        except sqlite3.Error:
            self._db.close()
            raise

    def sign_key(self) -> bytes:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'sign_key'").fetchone()
        if row is not None:
            return bytes(row[0])
        key = secrets.token_bytes(32)
        self._db.execute("INSERT INTO meta (name, value) VALUES ('sign_key', ?)", (key,))
        return key

    def load(self) -> tuple[list[StoredReceipt], dict[str, int]]:
        rows = self._db.execute(
            "SELECT receipt_id, idempotency_key, fiscal_document_number, fiscal_sign, ofd_received_at, item,"
            " deliveries FROM receipts ORDER BY fiscal_document_number"
        ).fetchall()
        records = [
            StoredReceipt(rid, key, number, sign, received_at, item.encode(), deliveries)
            for rid, key, number, sign, received_at, item, deliveries in rows
        ]
        counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return records, counters

    def save(
        self, new: Sequence[StoredReceipt], redelivered: Sequence[StoredReceipt], counters: dict[str, int]
    ) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT INTO receipts (idempotency_key, receipt_id, fiscal_document_number, fiscal_sign,"
                " ofd_received_at, item, deliveries) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.idempotency_key,
                        r.receipt_id,
                        r.fiscal_document_number,
                        r.fiscal_sign,
                        r.ofd_received_at,
                        r.item_json.decode(),
                        r.deliveries,
                    )
                    for r in new
                ],
            )
            self._db.executemany(
                "UPDATE receipts SET deliveries = ? WHERE idempotency_key = ?",
                [(r.deliveries, r.idempotency_key) for r in redelivered],
            )
            self._save_counters(counters)

    def save_counters(self, counters: dict[str, int]) -> None:
        with self._transaction():
            self._save_counters(counters)

    def clear(self) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM receipts")
            self._db.execute("DELETE FROM counters")

    def close(self) -> None:
        self._db.close()

    def _save_counters(self, counters: dict[str, int]) -> None:
        self._db.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            list(counters.items()),
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


@dataclass
class MockOfdState:
    """Everything the mock knows: its store, counters, mode and reject list. Shared by both listeners."""

    store_path: str | None = None
    sign_key: bytes | None = None
    seed: int | None = None
    mode: Mode = field(default_factory=Mode)
    rejected_pos_ids: frozenset[str] = frozenset()
    listener_hook: ListenerHook | None = None
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    by_key: dict[str, StoredReceipt] = field(default_factory=dict)
    by_id: dict[str, StoredReceipt] = field(default_factory=dict)
    _db: SqliteStore | None = field(default=None, init=False, repr=False)
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False)
    _mode_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)
        if self.store_path is not None:
            self._open_store(self.store_path)
        if self.sign_key is None:
            self.sign_key = secrets.token_bytes(32)

    def _open_store(self, path: str) -> None:
        db = SqliteStore(path)
        try:
            key = db.sign_key()
            records, counters = db.load()
        except BaseException:
            db.close()
            raise
        self._db = db
        self.sign_key = self.sign_key or key
        self.counters.update({k: v for k, v in counters.items() if k in self.counters})
        for record in records:
            self._index(record)

    @property
    def next_document_number(self) -> int:
        return len(self.by_key) + 1

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.save_counters(self.counters)
            finally:
                db.close()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def rng(self) -> random.Random:
        return self._rng

    def stats(self) -> dict[str, Any]:
        return {"unique": len(self.by_key), **self.counters, "mode": self.mode.name}

    def reset(self) -> None:
        if self._db is not None:
            self._db.clear()
        self.by_key.clear()
        self.by_id.clear()
        self.counters = dict.fromkeys(COUNTERS, 0)

    async def set_mode(self, mode: Mode, seed: int | None = None) -> None:
        async with self._mode_lock:
            old, self.mode = self.mode, mode
            if seed is not None:
                self._rng.seed(seed)
            if self.listener_hook is not None and old.name != mode.name:
                try:
                    await self.listener_hook(old.name, mode.name)
                except BaseException:
                    self.mode = old
                    raise
            log.info(
                "mock OFD mode %s -> %s (delay_s=%s fail_ratio=%s)", old.name, mode.name, mode.delay_s, mode.fail_ratio
            )

    def process(self, entries: Sequence[tuple[Any, str]]) -> list[dict[str, Any]]:
        """Acknowledge or reject each (decoded item, its JSON text); synchronous, so a batch is atomic."""
        batch = _Batch(_now_rfc3339())
        results = [self._process_one(item, text, batch) for item, text in entries]
        self._commit(batch, len(entries))
        log.debug(
            "batch of %d receipts: %d new, %d redelivered, %d rejected (mode %s)",
            len(entries),
            len(batch.new),
            batch.redeliveries,
            batch.rejected,
            self.mode.name,
        )
        return results

    def _process_one(self, item: Any, text: str, batch: _Batch) -> dict[str, Any]:
        key = item.get("idempotency_key") if isinstance(item, dict) else None
        known = (batch.new.get(key) or self.by_key.get(key)) if isinstance(key, str) else None
        if known is not None:
            # Checked first: an acknowledged receipt stays acknowledged whatever changed since.
            if known.receipt_id != item.get("receipt_id"):
                batch.rejected += 1
                return _rejection(item, "idempotency_key_reused", "idempotency_key already used by another receipt_id")
            known.deliveries += 1
            batch.redeliveries += 1
            if known.idempotency_key not in batch.new:
                batch.redelivered[known.idempotency_key] = known
            return known.ack
        problem = check_item(item, self.rejected_pos_ids)
        if problem is not None:
            batch.rejected += 1
            return _rejection(item, *problem)
        record = self._acknowledge(item, text, self.next_document_number + len(batch.new), batch.received_at)
        batch.new[record.idempotency_key] = record
        return record.ack

    def _acknowledge(self, item: dict[str, Any], text: str, number: int, received_at: str) -> StoredReceipt:
        assert self.sign_key is not None
        # Like a real fiscal sign it covers the document's identity and amount, not its whole text:
        # re-encoding every receipt here would cost the mock a quarter of its throughput.
        receipt = item["receipt"]
        fields = (
            str(number),
            item["idempotency_key"],
            item["receipt_id"],
            item["accepted_at"],
            receipt["pos_id"],
            str(receipt["total"]),
        )
        signed = "\x1f".join(fields).encode()
        digest = hmac.digest(self.sign_key, signed, "sha256")
        sign = f"{int.from_bytes(digest[:8], 'big') % 10**10:010d}"
        return StoredReceipt(item["receipt_id"], item["idempotency_key"], number, sign, received_at, text.encode())

    def _commit(self, batch: _Batch, received: int) -> None:
        counters = dict(self.counters)
        counters["received"] += received
        counters["redeliveries"] += batch.redeliveries
        counters["rejected"] += batch.rejected
        if self._db is not None:
            try:
                # Durable before the answer leaves: an acknowledged receipt must survive a mock restart.
                self._db.save(list(batch.new.values()), list(batch.redelivered.values()), counters)
            except BaseException:
                for record in batch.redelivered.values():
                    record.deliveries -= 1
                raise
        self.counters = counters
        for record in batch.new.values():
            self._index(record)

    def _index(self, record: StoredReceipt) -> None:
        self.by_key[record.idempotency_key] = record
        self.by_id[record.receipt_id] = record


def _rejection(item: object, code: str, message: str) -> dict[str, Any]:
    receipt_id = item.get("receipt_id") if isinstance(item, dict) else None
    return {"receipt_id": receipt_id, "error": {"code": code, "message": message}}


STATE_KEY: web.AppKey[MockOfdState] = web.AppKey("mock_ofd_state", MockOfdState)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, dumps=_dumps)


def _reset_connection(request: web.BaseRequest) -> web.Response:
    """Drop the connection with a TCP RST and no answer (what a crashing or unreachable OFD looks like)."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 turns close() into a reset: the client cannot mistake it for a clean end.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp notices the closed transport when writing this and drops it quietly.
    return web.Response(status=500)


_decoder = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def split_batch(text: str) -> list[tuple[Any, str]]:
    """Decode a JSON array of 1..MAX_BATCH items, keeping each item's own text next to its value.

    The text is what gets stored: slicing it out costs far less than encoding each receipt again.
    """
    pos = _skip(text, 0)
    if not text.startswith("[", pos):
        _reject_non_array(text)
    entries: list[tuple[Any, str]] = []
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        raise BadRequest(f"a batch holds 1..{MAX_BATCH} receipts, got 0")
    while True:
        try:
            value, end = _decoder.raw_decode(text, pos)
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
        entries.append((value, text[pos:end]))
        if len(entries) > MAX_BATCH:
            raise BadRequest(f"a batch holds 1..{MAX_BATCH} receipts, got more")
        pos = _skip(text, end)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif text.startswith("]", pos) and _skip(text, pos + 1) == len(text):
            return entries
        else:
            raise BadRequest("body is not valid JSON")


def _skip(text: str, pos: int) -> int:
    """Position of the first non-whitespace character at or after pos (JSON's four whitespace chars)."""
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


def _reject_non_array(text: str) -> NoReturn:
    try:
        json.loads(text)
    except ValueError:
        raise BadRequest("body is not valid JSON") from None
    raise BadRequest("body must be a JSON array of receipts")


async def _parse_batch(request: web.Request) -> list[tuple[Any, str]]:
    try:
        text = (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("body is not valid JSON (not UTF-8)") from None
    return split_batch(text)


async def handle_receipts(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.count("requests")
    mode = state.mode
    if mode.name == "offline":
        # Only reached by a connection opened before the listener closed, or on a bare create_app().
        return _reset_connection(request)
    if mode.name == "error500":
        state.count("failed_requests")
        return _error(500, "internal_error", "mock OFD is in error500 mode")
    if mode.name == "flaky" and state.rng().random() < mode.fail_ratio:
        state.count("failed_requests")
        if state.rng().random() < 0.5:
            return _error(500, "internal_error", "mock OFD flaked")
        return _reset_connection(request)
    try:
        entries = await _parse_batch(request)
    except BadRequest as exc:
        state.count("bad_requests")
        return _error(400, "bad_request", str(exc))
    if mode.name == "slow":
        await asyncio.sleep(mode.delay_s)
    results = state.process(entries)
    if mode.name == "drop_ack":
        state.count("dropped_acks")
        return _reset_connection(request)
    return web.Response(body=_dumps({"results": results}).encode(), content_type="application/json")


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text='{"error":{"code":"bad_request","message":"body is not JSON"}}', content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"error":{"code":"bad_request","message":"body must be an object"}}', content_type="application/json"
        )
    return body


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float:
    value = body.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}]")
    return float(value)


async def handle_mode(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await _json_object(request)
    name = body.get("mode")
    seed = body.get("seed")
    try:
        if name not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        mode = Mode(str(name), _number(body, "delay_s", 0.0, 3600.0), _number(body, "fail_ratio", 0.0, 1.0))
    except ValueError as exc:
        return _error(400, "bad_request", str(exc))
    try:
        await state.set_mode(mode, seed)
    except OSError as exc:
        return _error(500, "listener_error", f"cannot switch the main listener: {exc.strerror or exc}")
    return web.json_response(mode.as_dict())


async def handle_reject(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await _json_object(request)
    pos_ids = body.get("pos_ids")
    if not isinstance(pos_ids, list) or not all(isinstance(p, str) for p in pos_ids):
        return _error(400, "bad_request", "pos_ids must be a list of strings")
    state.rejected_pos_ids = frozenset(pos_ids)
    log.info("mock OFD rejects %d cash registers", len(pos_ids))
    return web.json_response({"pos_ids": sorted(state.rejected_pos_ids)})


async def handle_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    log.info("mock OFD store and counters cleared")
    return web.json_response({"reset": True})


async def handle_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats())


async def handle_receipt(request: web.Request) -> web.Response:
    record = request.app[STATE_KEY].by_id.get(request.match_info["receipt_id"])
    if record is None:
        return _error(404, "not_found", "no receipt with this receipt_id was acknowledged")
    return web.json_response(record.as_dict(), dumps=_dumps)


async def handle_receipt_list(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        return _error(400, "bad_request", "after and limit must be integers")
    limit = max(1, min(limit, 10000))
    # Document numbers are 1..N in insertion order, so the list is a slice.
    records = list(state.by_key.values())[max(after, 0) : max(after, 0) + limit]
    listed = [
        {
            "receipt_id": r.receipt_id,
            "idempotency_key": r.idempotency_key,
            "fiscal_document_number": r.fiscal_document_number,
            "deliveries": r.deliveries,
        }
        for r in records
    ]
    return web.json_response({"count": len(state.by_key), "receipts": listed})


def _admin_routes() -> list[web.RouteDef]:
    return [
        web.post("/admin/mode", handle_mode),
        web.post("/admin/reject", handle_reject),
        web.post("/admin/reset", handle_reset),
        web.get("/admin/stats", handle_stats),
        web.get("/admin/receipts", handle_receipt_list),
        web.get("/admin/receipts/{receipt_id}", handle_receipt),
    ]


def _build_app(state: MockOfdState, *, with_receipts: bool) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[STATE_KEY] = state
    if with_receipts:
        app.router.add_post("/v1/receipts", handle_receipts)
    app.router.add_routes(_admin_routes())
    return app


def create_app(
    store_path: str | None = None, *, seed: int | None = None, state: MockOfdState | None = None
) -> web.Application:
    """The full mock (receipts and admin routes) as one application, e.g. for aiohttp's test client.

    Without a MockOfd around it nobody can close the listening socket, so ``offline`` degrades to
    resetting each connection that sends receipts. The store is closed on application cleanup.
    """
    own_state = state is None
    state = state if state is not None else MockOfdState(store_path=store_path, seed=seed)
    app = _build_app(state, with_receipts=True)
    if own_state:

        async def close_store(_: web.Application) -> None:
            state.close()

        app.on_cleanup.append(close_store)
    return app


def _format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class MockOfd:
    """A running mock: the main listener (closed while offline) and the admin listener (always up)."""

    def __init__(
        self, host: str, port: int, admin_port: int | None, state: MockOfdState, admin_host: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.admin_host = admin_host or host
        self.admin_port_requested = admin_port if admin_port is not None else (port + 1 if port else 0)
        self.admin_port = 0
        self.state = state
        # Connections of the main listener with a request in progress (see _switch_listener).
        self._busy: set[Any] = set()
        main_app = _build_app(state, with_receipts=True)
        main_app.middlewares.append(self._track_busy)
        # A request held by slow mode must not hold up close() for aiohttp's default minute.
        self._main_runner = web.AppRunner(
            main_app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        self._admin_runner = web.AppRunner(
            _build_app(state, with_receipts=False),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        self._main_site: web.TCPSite | None = None
        self._started = False

    @property
    def url(self) -> str:
        return _format_url(self.host, self.port)

    @property
    def admin_url(self) -> str:
        return _format_url(self.admin_host, self.admin_port)

    async def start(self) -> None:
        try:
            await self._main_runner.setup()
            await self._admin_runner.setup()
            self._started = True
            await self._open_main()
            admin_site = web.TCPSite(self._admin_runner, self.admin_host, self.admin_port_requested)
            await admin_site.start()
            self.admin_port = admin_site.port
        except BaseException:
            await self.close()
            raise
        self.state.listener_hook = self._switch_listener
        log.info("mock OFD listening on %s (admin %s)", self.url, self.admin_url)

    async def set_mode(self, mode: str, delay_s: float = 0.0, fail_ratio: float = 0.0, seed: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        await self.state.set_mode(Mode(mode, float(delay_s), float(fail_ratio)), seed)

    def set_rejected_pos_ids(self, pos_ids: Sequence[str]) -> None:
        self.state.rejected_pos_ids = frozenset(pos_ids)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def stored(self, receipt_id: str) -> dict[str, Any] | None:
        record = self.state.by_id.get(receipt_id)
        return None if record is None else record.as_dict()

    async def close(self) -> None:
        self.state.listener_hook = None
        if self._started:
            self._started = False
            await self._main_runner.cleanup()
            await self._admin_runner.cleanup()
        self.state.close()

    async def __aenter__(self) -> MockOfd:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @web.middleware
    async def _track_busy(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = request.protocol
        self._busy.add(protocol)
        try:
            return await handler(request)
        finally:
            self._busy.discard(protocol)

    async def _open_main(self) -> None:
        site = web.TCPSite(self._main_runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await site.stop()  # a site that failed to bind would stay registered with the runner
            raise
        self._main_site = site
        self.port = site.port  # the bound one: what port 0 picked is kept for coming back online

    async def _switch_listener(self, old: str, new: str) -> None:
        if new == "offline" and self._main_site is not None:
            site, self._main_site = self._main_site, None
            await site.stop()
            server = self._main_runner.server
            for connection in server.connections if server is not None else ():
                # Idle keep-alive connections close now (a client reusing one must not reach us), busy
                # ones right after their answer (it may be the request that switched us offline).
                if connection in self._busy:
                    connection.close()
                else:
                    connection.force_close()
        elif old == "offline" and self._main_site is None:
            await self._open_main()


async def start_mock_ofd(
    host: str = "127.0.0.1",
    port: int = 0,
    db_path: str | None = None,
    *,
    admin_port: int | None = None,
    seed: int | None = None,
    sign_key: bytes | None = None,
) -> MockOfd:
    """Start a mock in this event loop; port 0 picks a free port (then the admin port is free too)."""
    state = MockOfdState(store_path=db_path, seed=seed, sign_key=sign_key)
    mock = MockOfd(host, port, admin_port, state)
    await mock.start()
    return mock


async def start_embedded(settings: KktdOfdSettings) -> EmbeddedMock:
    """`kktd serve --embedded-mock` (development): a mock in kktd's own event loop, and the settings that
    send to it."""
    mock = await start_mock_ofd("127.0.0.1", 0)
    return EmbeddedMock(
        dataclasses.replace(settings, url=str(mock.url)), f"mock OFD on {mock.url} (admin {mock.admin_url})", mock.close
    )


async def _serve(host: str, port: int, admin: tuple[str, int] | None, db_path: str | None, seed: int | None) -> None:
    state = MockOfdState(store_path=db_path, seed=seed)
    mock = MockOfd(host, port, admin[1] if admin else None, state, admin_host=admin[0] if admin else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await mock.start()
        print(f"mock OFD: {mock.url}/v1/receipts, admin {mock.admin_url}/admin/stats", flush=True)
        await stop.wait()
    finally:
        await mock.close()


def run(listen: str, db_path: str | None, admin_listen: str | None = None, seed: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM. Exit codes: 0 clean stop, 78 bad address, 74 store or socket unusable."""
    try:
        host, port = parse_listen(listen)
        admin = parse_listen(admin_listen) if admin_listen else None
    except ValueError as exc:
        print(f"kktd mock-ofd: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        asyncio.run(_serve(host, port, admin, db_path, seed))
    except sqlite3.Error as exc:
        print(f"kktd mock-ofd: cannot open the store {db_path}: {exc}", file=sys.stderr)
        return EX_IOERR
    except OSError as exc:
        print(f"kktd mock-ofd: cannot listen: {exc}", file=sys.stderr)
        return EX_IOERR
    return EX_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kktd mock-ofd", description="Mock OFD for tests and development.")
    parser.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT of POST /v1/receipts")
    parser.add_argument(
        "--admin-listen",
        default=None,
        help="HOST:PORT of the admin API, which stays up while offline (default: port + 1)",
    )
    parser.add_argument("--db", default=None, help="SQLite file for a store that survives restarts")
    parser.add_argument("--seed", type=int, default=None, help="seed of the flaky mode's random choices")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.listen, args.db, args.admin_listen, args.seed)


if __name__ == "__main__":
    sys.exit(main())
