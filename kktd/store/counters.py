"""What the writer knows about the buffer without asking the database: receipts per status, the oldest unsent
one, commits. Kept by the writer's jobs as they move rows, inside the same job (a failure or a cancelled
caller between two statements cannot leave them apart from the rows), so that status, health and a metrics
scrape read memory, never the database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import aiosqlite

from kktd.store import queries
from kktd.store.rows import Counts, ReceiptStatus

UNSENT = frozenset({ReceiptStatus.PENDING, ReceiptStatus.SUBMITTED})  # accepted, not fiscalized yet


@dataclass
class StoreCounters:
    counts: Counts
    # accepted_ms of the oldest receipt not fiscalized yet (pending or submitted).
    oldest_unsent_ms: int | None
    # Told the rows of each group commit (kktd.metrics); set once, when the store opens.
    on_group_commit: Callable[[int], None] | None = field(default=None, repr=False)
    commits: int = 0  # group commits of intake: the sync loop sees the till is busy when they move
    committed_rows: int = 0

    def group_committed(self, inserted: int, accepted_ms: int) -> None:
        self.counts.pending += inserted
        self.commits += 1
        self.committed_rows += inserted
        if self.oldest_unsent_ms is None and inserted:
            self.oldest_unsent_ms = accepted_ms
        if self.on_group_commit is not None:
            self.on_group_commit(inserted)

    async def moved(self, conn: aiosqlite.Connection, source: ReceiptStatus, target: ReceiptStatus, count: int) -> None:
        """`count` rows went from `source` to `target` in the job running on `conn`."""
        self.counts.move(source, target, count)
        if count and (source in UNSENT) != (target in UNSENT):
            await self.refresh_oldest(conn)

    def pruned(self, count: int) -> None:
        self.counts.sent -= count

    async def refresh_oldest(self, conn: aiosqlite.Connection) -> None:
        """After rows left or joined the unsent ones: lookups on the partial indexes, inside the job that
        moved them."""
        self.oldest_unsent_ms = await queries.oldest_unsent_ms(conn)

    async def recount(self, conn: aiosqlite.Connection) -> None:
        self.counts = await queries.count_by_status(conn)
        self.oldest_unsent_ms = await queries.oldest_unsent_ms(conn)
