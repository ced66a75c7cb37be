"""The two baselines kktd is measured against, each a single-process aiohttp server on the same stack.

    python bench/baselines.py minimal --listen 127.0.0.1:PORT
    python bench/baselines.py bare    --listen 127.0.0.1:PORT
    python bench/baselines.py naive   --listen 127.0.0.1:PORT --db PATH

`minimal` reads the body, `json.loads` it and answers 201 with a body of the shape and size kktd answers:
no validation, no storage, the ceiling of the HTTP stack itself (aiohttp on this interpreter). `bare`
parses and validates every receipt with kktd's own validator and answers 201 without storing it: the
ceiling of aiohttp + the validator on this machine. `naive` adds what the obvious durable design does: one
INSERT committed per request (WAL, synchronous=FULL) on one aiosqlite connection. It is built as well as that
design allows: the connection is in autocommit mode, so the INSERT is its own transaction and costs a single
round trip to aiosqlite's thread (no separate BEGIN/COMMIT hops), and sqlite3's statement cache keeps the
INSERT prepared. Both answer the same JSON kktd answers, so response encoding costs the same in all three.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
from aiohttp import web

from kktd.api import api_error
from kktd.errors import ApiError
from kktd.receipt import Receipt, ReceiptInvalid, parse_receipt

MAX_BODY = 64 * 1024
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    seq             INTEGER PRIMARY KEY,
    receipt_id      TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL UNIQUE,
    pos_id          TEXT NOT NULL,
    total           INTEGER NOT NULL,
    body_hash       TEXT NOT NULL,
    canonical_json  TEXT NOT NULL,
    accepted_at     TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
)
"""
INSERT = (
    "INSERT INTO receipts (receipt_id, idempotency_key, pos_id, total, body_hash, canonical_json, "
    "accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
EXISTING = "SELECT receipt_id, body_hash, total, accepted_at FROM receipts WHERE idempotency_key = ?"

Store = Callable[[Receipt, str, str], Awaitable[tuple[int, dict[str, Any]]]]


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def accepted(receipt_id: str, total: int, accepted_at: str) -> dict[str, Any]:
    return {"receipt_id": receipt_id, "status": "pending", "total": total, "accepted_at": accepted_at}


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


async def store_nothing(receipt: Receipt, receipt_id: str, accepted_at: str) -> tuple[int, dict[str, Any]]:
    return 201, accepted(receipt_id, receipt.total, accepted_at)


class NaiveStore:
    """One INSERT, committed on its own, per request."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> NaiveStore:
        # isolation_level=None: autocommit, so each INSERT commits (and fsyncs the WAL) by itself.
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute(SCHEMA)
        return cls(db)

    async def __call__(self, receipt: Receipt, receipt_id: str, accepted_at: str) -> tuple[int, dict[str, Any]]:
        row = (
            receipt_id,
            receipt.idempotency_key,
            receipt.pos_id,
            receipt.total,
            receipt.body_hash,
            receipt.canonical_json,
            accepted_at,
        )
        try:
            await self.db.execute(INSERT, row)
        except sqlite3.IntegrityError:
            return await self._replay(receipt)
        return 201, accepted(receipt_id, receipt.total, accepted_at)

    async def _replay(self, receipt: Receipt) -> tuple[int, dict[str, Any]]:
        # The idempotency rules kktd follows: same key and body -> 200 with the first answer, else 409.
        async with self.db.execute(EXISTING, (receipt.idempotency_key,)) as cursor:
            found = await cursor.fetchone()
        if found is None or found[1] != receipt.body_hash:
            raise ApiError(409, "idempotency_conflict", "this idempotency_key was used for another receipt")
        return 200, accepted(found[0], found[2], found[3])

    async def close(self) -> None:
        await self.db.close()


def make_minimal_app() -> web.Application:
    """The HTTP stack's ceiling: the same route, body size limit and content-type check, json.loads, 201."""

    async def post_receipt(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return error_response(ApiError(415, "unsupported_media_type", "send application/json"))
        try:
            json.loads(await request.read())
        except ValueError:
            return error_response(ApiError(400, "invalid_json", "request body is not valid JSON"))
        # kktd's answer is a fixed-shape JSON of ~120 bytes; this one has the same shape and size.
        body = f'{{"receipt_id":"{uuid.uuid4().hex}","status":"pending","total":0,"accepted_at":"{now_rfc3339()}"}}'
        return web.Response(body=body.encode(), status=201, headers=JSON_HEADERS)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/kkt/receipt", post_receipt)
    app.router.add_get("/v1/health", health)
    return app


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app(store: Store) -> web.Application:
    async def post_receipt(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return error_response(ApiError(415, "unsupported_media_type", "send application/json"))
        try:
            receipt = parse_receipt(await request.read(), request.headers.get("Idempotency-Key"))
            status, body = await store(receipt, uuid.uuid4().hex, now_rfc3339())
        except ReceiptInvalid as exc:
            return error_response(api_error(exc))
        except ApiError as exc:
            return error_response(exc)
        return web.json_response(body, status=status, dumps=compact_dumps)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/kkt/receipt", post_receipt)
    app.router.add_get("/v1/health", health)
    return app


def compact_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def serve(kind: str, host: str, port: int, db_path: Path | None) -> None:
    naive = await NaiveStore.open(db_path) if kind == "naive" and db_path else None
    if kind == "minimal":
        app = make_minimal_app()
    else:
        app = make_app(naive if naive is not None else store_nothing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
        if naive is not None:
            await naive.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("minimal", "bare", "naive"))
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--db", type=Path, help="database file (naive only)")
    args = parser.parse_args()
    if args.kind == "naive" and args.db is None:
        parser.error("naive needs --db")
    host, _, port = args.listen.rpartition(":")
    # The same quiet level kktd runs with under the benchmark (--log-level warning).
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.kind, host, int(port), args.db))


if __name__ == "__main__":
    main()
