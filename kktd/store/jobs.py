"""The writer's jobs, one small dataclass per kind (as Home Assistant's recorder has its tasks): what runs on
the writer's connection between two transactions, with the counters it keeps in step with the rows.

A job names what it does (it is what a crash of it logs), says whether it writes (a job that only reads may
run before the WAL's stamp after a checkpoint), and runs as `await job.run(conn, counters)`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import aiosqlite

from kktd.clock import now_ms
from kktd.store import queries
from kktd.store.counters import StoreCounters
from kktd.store.rows import ReceiptStatus

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
Query = Callable[..., Awaitable[T]]


class Job(Protocol[T_co]):
    @property
    def writes(self) -> bool: ...

    @property
    def name(self) -> str: ...

    async def run(self, conn: aiosqlite.Connection, counters: StoreCounters) -> T_co: ...


@dataclass(frozen=True, slots=True)
class Read(Generic[T]):
    """One of kktd.store.queries' reads, with its arguments after the connection."""

    query: Query[T]
    args: tuple[Any, ...] = ()
    writes: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return f"read {self.query.__name__}"

    async def run(self, conn: aiosqlite.Connection, counters: StoreCounters) -> T:
        return await self.query(conn, *self.args)


@dataclass(frozen=True, slots=True)
class Move:
    """An UPDATE of kktd.store.queries that moves rows from `source` to `target` (its result: how many)."""

    source: ReceiptStatus
    target: ReceiptStatus
    statement: Query[int]
    args: tuple[Any, ...]
    writes: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.statement.__name__

    async def run(self, conn: aiosqlite.Connection, counters: StoreCounters) -> int:
        changed = await self.statement(conn, *self.args)
        await counters.moved(conn, self.source, self.target, changed)
        return changed


@dataclass(frozen=True, slots=True)
class RecordAttemptFailure:
    """A failed delivery noted on pending receipts; with `strike`, counted, and those past `max_attempts`
    dead-lettered (the ids returned)."""

    receipt_ids: Sequence[str]
    reason: str
    max_attempts: int
    strike: bool
    writes: ClassVar[bool] = True
    name: ClassVar[str] = "record_attempt_failure"

    async def run(self, conn: aiosqlite.Connection, counters: StoreCounters) -> list[str]:
        moved = await queries.record_attempt_failure(
            conn, now_ms(), self.receipt_ids, self.reason, self.max_attempts, self.strike
        )
        await counters.moved(conn, ReceiptStatus.PENDING, ReceiptStatus.FAILED, len(moved))
        return moved


@dataclass(frozen=True, slots=True)
class PruneSent:
    """Retention: up to `limit` sent receipts acknowledged before `older_than_ms` deleted."""

    older_than_ms: int
    limit: int
    writes: ClassVar[bool] = True
    name: ClassVar[str] = "prune_sent"

    async def run(self, conn: aiosqlite.Connection, counters: StoreCounters) -> int:
        deleted = await queries.prune_sent(conn, self.older_than_ms, self.limit)
        counters.pruned(deleted)
        return deleted


@dataclass(frozen=True, slots=True)
class Recount:
    """The counters from the rows again, after an intake whose caller was cancelled while its statement may
    still have committed in aiosqlite's thread."""

    writes: ClassVar[bool] = False
    name: ClassVar[str] = "recount"

    async def run(self, conn: aiosqlite.Connection, counters: StoreCounters) -> None:
        await counters.recount(conn)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """Any function of the connection (tests, tools): `Store.run(fn)`."""

    fn: Callable[[aiosqlite.Connection], Awaitable[T]]
    writes: bool = True

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    async def run(self, conn: aiosqlite.Connection, counters: StoreCounters) -> T:
        return await self.fn(conn)
