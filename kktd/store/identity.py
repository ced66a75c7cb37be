"""Whose WAL is this? A `-wal` file is applied by SQLite to whatever database file sits beside it: a restored
backup or a copied directory next to another database's WAL silently becomes that other database. kktd
checks, before SQLite opens anything, that the WAL is its database's own.

The binding (the stamp protocol):
- every database holds one row in `kktd_identity`: a random 16-byte database id and a WAL generation;
- kktd runs every checkpoint itself (wal_autocheckpoint = 0) and the first write after each carries a
  stamp: generation + 1, written as the blob STAMP_MAGIC + database id + generation (8 bytes, big-endian),
  in the same transaction as the receipts of the next group commit (or alone, before a job's write). SQLite
  starts a new WAL only at the first write after a checkpoint backfilled everything, so the first
  transaction of every WAL kktd writes holds a stamp, and every stamp sits in the WAL as plain bytes of the
  identity row's page;
- the id's first 4 bytes are also the file header's application_id: readable even when a checkpoint was
  interrupted half-way and the file alone is not yet a consistent database;
- at open, the WAL's committed frames are read as SQLite's recovery reads them (salts and the running
  checksum from the header on, up to the last valid commit frame) and the database file itself is read
  without the WAL (`immutable=1`: no -shm, no lock, nothing written). The WAL is the database's own if
  its first transaction holds a stamp with the database's id, and the database file's generation lies
  between that stamp's generation - 1 (the WAL started from this very file) and the WAL's last stamp
  (checkpoints already copied part of it back).
A WAL of another database has another id; the WAL a database had before an older backup of it was restored
carries generations the backup has not reached. Either way nothing is opened and neither file changes.
"""

from __future__ import annotations

import enum
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

STAMP_MAGIC = b"KKTDWAL1"
STAMP_SIZE = len(STAMP_MAGIC) + 16 + 8
WAL_MAGIC_LE = 0x377F0682  # frame checksums over little-endian words
WAL_MAGIC_BE = 0x377F0683  # ... over big-endian words
WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
DB_HEADER_SIZE = 100


@dataclass(frozen=True)
class WalHeader:
    magic: int
    version: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    checksum1: int
    checksum2: int

    @property
    def big_endian(self) -> bool:
        return self.magic == WAL_MAGIC_BE


@dataclass(frozen=True)
class DbHeader:
    page_size: int
    change_counter: int
    page_count: int
    user_version: int
    application_id: int


@dataclass(frozen=True)
class Stamp:
    db_id: bytes
    generation: int

    def encode(self) -> bytes:
        return STAMP_MAGIC + self.db_id + self.generation.to_bytes(8, "big")

    @classmethod
    def decode(cls, blob: bytes) -> Stamp | None:
        if len(blob) != STAMP_SIZE or not blob.startswith(STAMP_MAGIC):
            return None
        return cls(blob[8:24], int.from_bytes(blob[24:32], "big"))

    def describe(self) -> str:
        return f"database id {self.db_id.hex()}, WAL generation {self.generation}"


class WalVerdict(enum.StrEnum):
    NO_WAL = "no_wal"  # nothing beside the database
    NOTHING_COMMITTED = "nothing_committed"  # SQLite would apply nothing from it
    OWN = "own"
    FOREIGN = "foreign"
    UNSTAMPED = "unstamped"  # a database from before the stamp protocol (or created and killed at once)


@dataclass(frozen=True)
class WalCheck:
    verdict: WalVerdict
    detail: str

    @property
    def refused(self) -> bool:
        return self.verdict is WalVerdict.FOREIGN


def wal_path(db: Path) -> Path:
    return Path(f"{db}-wal")


def shm_path(db: Path) -> Path:
    return Path(f"{db}-shm")


# The WAL-index (-shm) starts with two copies of its 48-byte header, then the checkpoint information
# (https://www.sqlite.org/walformat.html#the_wal_index_file_format), in the machine's byte order.
WAL_INDEX_MX_FRAME = 16  # u32: frames in the WAL that hold valid, committed content
WAL_INDEX_N_BACKFILL = 96  # u32: frames of it a checkpoint has copied into the database file
WAL_INDEX_READ = WAL_INDEX_N_BACKFILL + 4


def frames_to_checkpoint(header: bytes) -> int | None:
    """Frames of the WAL no checkpoint has copied into the database yet, from the first WAL_INDEX_READ
    bytes of the -shm file (None if they do not read as a WAL-index)."""
    if len(header) < WAL_INDEX_READ:
        return None
    (version,) = struct.unpack_from("=I", header, 0)
    if version != 3007000:
        return None
    (mx_frame,) = struct.unpack_from("=I", header, WAL_INDEX_MX_FRAME)
    (backfilled,) = struct.unpack_from("=I", header, WAL_INDEX_N_BACKFILL)
    return max(0, mx_frame - backfilled)


def parse_wal_header(data: bytes) -> WalHeader | None:
    if len(data) < WAL_HEADER_SIZE:
        return None
    header = WalHeader(*struct.unpack(">8I", data[:WAL_HEADER_SIZE]))
    if header.magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE) or header.version != 3007000:
        return None
    if not 512 <= header.page_size <= 65536 or header.page_size & (header.page_size - 1):
        return None
    return header


def read_db_header(path: Path) -> DbHeader | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read(DB_HEADER_SIZE)
    except FileNotFoundError:
        return None
    if len(data) < DB_HEADER_SIZE or not data.startswith(b"SQLite format 3\x00"):
        return None
    page_size = struct.unpack(">H", data[16:18])[0]
    return DbHeader(
        page_size=65536 if page_size == 1 else page_size,
        change_counter=struct.unpack(">I", data[24:28])[0],
        page_count=struct.unpack(">I", data[28:32])[0],
        user_version=struct.unpack(">I", data[60:64])[0],
        application_id=struct.unpack(">i", data[68:72])[0],
    )


def wal_checksum(data: bytes, s1: int, s2: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum (walChecksumBytes): over pairs of 32-bit words, running on from (s1, s2)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for index in range(0, len(words), 2):
        s1 = (s1 + words[index] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[index + 1] + s1) & 0xFFFFFFFF
    return s1, s2


def committed_transactions(wal: bytes) -> list[list[bytes]] | None:
    """The pages of each transaction SQLite's recovery would apply from this WAL (None: no valid header)."""
    header = parse_wal_header(wal)
    if header is None:
        return None
    if wal_checksum(wal[:24], 0, 0, header.big_endian) != (header.checksum1, header.checksum2):
        return None
    s1, s2 = header.checksum1, header.checksum2
    transactions: list[list[bytes]] = []
    current: list[bytes] = []
    frame_size = FRAME_HEADER_SIZE + header.page_size
    offset = WAL_HEADER_SIZE
    while offset + frame_size <= len(wal):
        page_number, commit_size, salt1, salt2, check1, check2 = struct.unpack(
            ">6I", wal[offset : offset + FRAME_HEADER_SIZE]
        )
        if page_number == 0 or (salt1, salt2) != (header.salt1, header.salt2):
            break
        page = wal[offset + FRAME_HEADER_SIZE : offset + frame_size]
        s1, s2 = wal_checksum(wal[offset : offset + 8], s1, s2, header.big_endian)
        s1, s2 = wal_checksum(page, s1, s2, header.big_endian)
        if (s1, s2) != (check1, check2):
            break
        current.append(page)
        if commit_size:
            transactions.append(current)
            current = []
        offset += frame_size
    return transactions


def stamps_in(pages: list[bytes]) -> list[Stamp]:
    found: list[Stamp] = []
    for page in pages:
        start = page.find(STAMP_MAGIC)
        while start != -1:
            stamp = Stamp.decode(page[start : start + STAMP_SIZE])
            if stamp is not None:
                found.append(stamp)
            start = page.find(STAMP_MAGIC, start + 1)
    return found


def database_stamp(db: Path) -> Stamp | None:
    """The stamp in the database file itself, WAL ignored (immutable=1 reads only the main file and
    creates nothing beside it). None if the file has no identity (older kktd, or new)."""
    try:
        conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT db_id, generation FROM kktd_identity WHERE id = 1").fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    if row is None or not isinstance(row[0], bytes) or len(row[0]) != 16:
        return None
    return Stamp(bytes(row[0]), int(row[1]))


def check_wal(db: Path) -> WalCheck:
    """Is the -wal beside `db` the database's own? Reads both files; writes nothing."""
    wal_file = wal_path(db)
    try:
        wal = wal_file.read_bytes()
    except FileNotFoundError:
        return WalCheck(WalVerdict.NO_WAL, f"no {wal_file}")
    transactions = committed_transactions(wal)
    if not transactions:
        return WalCheck(
            WalVerdict.NOTHING_COMMITTED, f"{wal_file} holds no committed transaction (SQLite applies nothing from it)"
        )
    db_header = read_db_header(db)
    wal_header = parse_wal_header(wal)
    assert wal_header is not None
    if db_header is None:
        return WalCheck(
            WalVerdict.FOREIGN,
            f"{wal_file} holds {len(transactions)} committed transactions but "
            f"{db} is missing or not an SQLite database: the WAL cannot be its own",
        )
    if db_header.page_size != wal_header.page_size:
        return WalCheck(
            WalVerdict.FOREIGN,
            f"{wal_file} has pages of {wal_header.page_size} bytes, {db} of "
            f"{db_header.page_size}: they are not one database",
        )
    mine = database_stamp(db)
    ours = [[stamp for stamp in stamps_in(pages)] for pages in transactions]
    every = [stamp for stamps in ours for stamp in stamps]
    if mine is None:
        if db_header.application_id == 0:
            return WalCheck(
                WalVerdict.UNSTAMPED,
                f"{db} carries no kktd identity (written by an older kktd, "
                f"or new): {wal_file} cannot be checked and is applied as SQLite does",
            )
        # The file alone does not read as a database: a checkpoint was copying this WAL into it when kktd
        # stopped. Its header still names the database (application_id: the id's first 4 bytes).
        if any(id_prefix(stamp.db_id) == db_header.application_id for stamp in every):
            return WalCheck(
                WalVerdict.OWN,
                f"{wal_file}: stamped by database {db_header.application_id:#x} ({db} was being checkpointed)",
            )
        whose = every[0].describe() if every else "no kktd stamp"
        return WalCheck(
            WalVerdict.FOREIGN,
            f"{wal_file} belongs to another database ({whose}; {db} is "
            f"database {db_header.application_id & 0xFFFFFFFF:#010x}...)",
        )
    # A page may still hold an older copy of the row in its free space: the newest generation is the row.
    matching = [[stamp.generation for stamp in stamps if stamp.db_id == mine.db_id] for stamps in ours]
    first = next((generations for generations in matching if generations), None)
    if first is None:
        whose = every[0].describe() if every else "no kktd stamp"
        return WalCheck(
            WalVerdict.FOREIGN, f"{wal_file} belongs to another database ({whose}; {db} is {mine.describe()})"
        )
    start, last = max(first), max(g for generations in matching for g in generations)
    if not start - 1 <= mine.generation <= last:
        return WalCheck(
            WalVerdict.FOREIGN,
            f"{wal_file} continues {db} from WAL generation {start - 1} to "
            f"{last}, but {db} is at generation {mine.generation}: the database file was replaced "
            f"(a restored backup?) and this WAL is from its other life",
        )
    return WalCheck(WalVerdict.OWN, f"{wal_file}: generations {start}..{last} of {mine.describe()}")


def id_prefix(db_id: bytes) -> int:
    """The database id's first 4 bytes as the signed 32-bit PRAGMA application_id in the file header."""
    return int.from_bytes(db_id[:4], "big", signed=True)
