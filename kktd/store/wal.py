"""The WAL keeper: when the writer checkpoints, and the identity stamp every WAL kktd writes begins with.

Checkpoints (copying the WAL into the database file and fsyncing it) are kept out of the commits: SQLite's
automatic checkpoint is off (it would run inside the COMMIT that crosses its threshold), and the writer runs a
PASSIVE checkpoint between two transactions once the WAL holds CHECKPOINT_FRAMES frames not yet copied, at a
moment no intake is waiting (or, past CHECKPOINT_FORCE_FRAMES, at once). The new WAL's stamp
(kktd/store/identity.py) rides in the first transaction after it, which SQLite starts the new WAL with.

Used by the writer task only (kktd/store/writer.py), between transactions, on the writer's connection.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from kktd.store import identity, queries, schema

log = logging.getLogger("kktd.store")

# A checkpoint is due once the WAL holds this many frames (pages) no checkpoint has copied yet: SQLite's own
# default (wal_autocheckpoint=1000, what `naive` runs with). Each checkpoint costs two flushes and the restart
# of the WAL a third, whatever it copies, so a trigger by rows (256 rows, issue 13) checkpointed eight times as
# often at 64 connections, where a row costs half a frame, as at one, where it costs four and a half.
CHECKPOINT_FRAMES = 1000
CHECKPOINT_FORCE_FRAMES = 4 * CHECKPOINT_FRAMES  # ...and past this it runs even while intakes are waiting


class WalKeeper:
    """Checkpoints and stamps of one database's WAL. `refused(reason)` is told when the disk refuses a write
    (a full disk, an I/O error), so health can say so."""

    def __init__(
        self, path: Path, conn: aiosqlite.Connection, stamp: identity.Stamp, refused: Callable[[str], None]
    ) -> None:
        self._path = path
        self._conn = conn
        self._stamp = stamp
        self._refused = refused
        self.needs_stamp = False  # a checkpoint ran: the next write must carry the stamp
        self.checkpoint_queued = False  # an intake that committed alone asked the writer for one
        self.checkpoints = 0
        self._shm: int | None = None  # the -shm file, read for the WAL's frame count (identity.py)
        # Frames the last checkpoint could not copy (a reader's snapshot, the integrity check's, still needed
        # them): the next one is due CHECKPOINT_FRAMES later, not after every batch until the reader is gone.
        self._uncopied_after_checkpoint = 0

    @property
    def stamp(self) -> identity.Stamp:
        """The stamp of the WAL being written (or due at the next write)."""
        return self._stamp

    def close(self) -> None:
        if self._shm is not None:
            os.close(self._shm)
            self._shm = None

    # ---- when ----

    def _frames_to_checkpoint(self) -> int | None:
        """The WAL's frames no checkpoint has copied yet, read from the WAL-index header in the -shm file
        (a read of 100 bytes from the page cache, between transactions: nothing is changing it). None if it
        cannot be read, which does not happen while SQLite uses the file."""
        try:
            if self._shm is None:
                self._shm = os.open(identity.shm_path(self._path), os.O_RDONLY | os.O_CLOEXEC)
            frames = identity.frames_to_checkpoint(os.pread(self._shm, identity.WAL_INDEX_READ, 0))
        except OSError:
            frames = None
        if frames is None:
            self.close()
        return frames

    def _new_frames(self) -> int:
        """Frames written since the last checkpoint, beyond those it could not copy. Unknown: as many as
        force one (checkpointing too often is slow; a WAL that grows without bound is worse)."""
        frames = self._frames_to_checkpoint()
        if frames is None:
            return CHECKPOINT_FORCE_FRAMES
        return frames - self._uncopied_after_checkpoint

    def checkpoint_due(self) -> bool:
        return self._new_frames() >= CHECKPOINT_FRAMES

    async def checkpoint_if_due(self, intakes_waiting: bool) -> None:
        """Between transactions, once the WAL holds CHECKPOINT_FRAMES frames not yet copied: PASSIVE (it never
        waits for the background integrity check's reader). Not while intakes are waiting for the writer,
        unless the WAL has reached CHECKPOINT_FORCE_FRAMES."""
        frames = self._new_frames()
        if frames < CHECKPOINT_FRAMES:
            return
        if intakes_waiting and frames < CHECKPOINT_FORCE_FRAMES:
            return
        await self.checkpoint("PASSIVE")
        self._uncopied_after_checkpoint = self._frames_to_checkpoint() or 0
        self.checkpoints += 1

    # ---- what ----

    async def checkpoint(self, mode: str) -> None:
        """SQLite restarts the WAL at the first write after a checkpoint that copied everything: from here
        on that write must carry the stamp (the next intake group does; a job first stamps alone), so every
        WAL kktd writes begins with one (kktd/store/identity.py)."""
        try:
            await self._conn.execute(f"PRAGMA wal_checkpoint({mode})")
        except sqlite3.Error as exc:
            log.error("checkpoint of %s failed: %s", self._path, schema.describe_error(exc))
            if schema.refuses_writes(exc):
                self._refused(schema.describe_error(exc))
        self.needs_stamp = True

    async def stamp_if_needed(self) -> None:
        """The stamp alone, when a checkpoint ran and no intake group carried it yet. If it cannot be written
        (a full disk, an I/O error) it stays due: the next group carries it or the next writing job tries
        again, and that job's own write meets the same refusal."""
        if not self.needs_stamp:
            return
        try:
            self._stamp = await write_stamp(self._conn, self._stamp)
        except sqlite3.Error as exc:
            reason = schema.describe_error(exc)
            log.error("cannot stamp the WAL of %s: %s", self._path, reason)
            if schema.refuses_writes(exc):
                self._refused(reason)
            return
        self.needs_stamp = False

    async def insert_stamped(self, rows: list[tuple[Any, ...]]) -> set[str]:
        """The first write after a checkpoint: the stamp and the group in one transaction (four round trips
        to SQLite's thread instead of one, but a single flush instead of two commits' worth). Run by the
        writer task only, which nobody cancels mid-transaction; a failure is rolled back by the caller."""
        await self._conn.execute("BEGIN IMMEDIATE")
        stamp = await write_stamp(self._conn, self._stamp)
        inserted = await queries.insert_receipts(self._conn, rows)
        await self._conn.execute("COMMIT")
        self._stamp, self.needs_stamp = stamp, False
        return inserted


async def read_identity(conn: aiosqlite.Connection) -> identity.Stamp:
    row = await schema.fetch_one(conn, "SELECT db_id, generation FROM kktd_identity WHERE id = 1")
    return identity.Stamp(bytes(row[0]), int(row[1]))


async def name_in_header(conn: aiosqlite.Connection, stamp: identity.Stamp) -> None:
    """The id's first 4 bytes in the file header (once per database): readable mid-checkpoint too."""
    expected = identity.id_prefix(stamp.db_id)
    row = await schema.fetch_one(conn, "PRAGMA application_id")
    if row[0] != expected:
        await conn.execute(f"PRAGMA application_id = {expected}")


async def write_stamp(conn: aiosqlite.Connection, previous: identity.Stamp) -> identity.Stamp:
    stamp = identity.Stamp(previous.db_id, previous.generation + 1)
    await conn.execute(
        "UPDATE kktd_identity SET generation = ?, stamp = ? WHERE id = 1", (stamp.generation, stamp.encode())
    )
    return stamp
