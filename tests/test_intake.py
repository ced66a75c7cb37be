"""Intake through the real app and buffer: idempotency, capacity, group commit, reads, storage failures."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kktd.errors import CorruptDatabase, StorageUnavailable
from kktd.receipt import parse_receipt, sample_receipt
from kktd.store import PRAGMAS, SCHEMA_VERSION, Accepted, Store, queries, wal, writer
from kktd.store.identity import (
    WAL_INDEX_READ,
    WalVerdict,
    check_wal,
    committed_transactions,
    frames_to_checkpoint,
    shm_path,
    stamps_in,
    wal_path,
)
from tests.conftest import App, close_app, open_app
from tests.support import KKTD_BIN, require


async def post(app: App, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    response = await app.client.post("/v1/kkt/receipt", json=body, headers=headers)
    return response.status, await response.json()


# ---- idempotency ----


async def test_created_then_replayed_with_same_id(app: App) -> None:
    status, first = await post(app, sample_receipt("idem-1"))
    assert status == 201
    assert first["status"] == "pending" and first["total"] == 24430
    assert first["accepted_at"].endswith("Z")
    status, again = await post(app, sample_receipt("idem-1"))
    assert status == 200
    assert again == first
    assert await app.row_count() == 1


async def test_key_in_header_replays_key_in_body(app: App) -> None:
    body = sample_receipt("idem-h")
    status, first = await post(app, body)
    del body["idempotency_key"]
    status, again = await post(app, body, headers={"Idempotency-Key": "idem-h"})
    assert status == 200 and again["receipt_id"] == first["receipt_id"]


async def test_same_key_different_body_is_409(app: App) -> None:
    await post(app, sample_receipt("idem-2"))
    other = sample_receipt("idem-2", pos_id="POS-002")
    status, answer = await post(app, other)
    assert status == 409
    assert answer["error"]["code"] == "idempotency_conflict"
    assert answer["error"]["field"] == "idempotency_key"
    assert await app.row_count() == 1


async def test_fifty_concurrent_duplicates_make_one_row(app: App) -> None:
    results = await asyncio.gather(*(post(app, sample_receipt("dup-50")) for _ in range(50)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 49 + [201]
    assert len({answer["receipt_id"] for _, answer in results}) == 1
    assert await app.row_count() == 1


async def test_concurrent_duplicates_with_a_conflicting_body(app: App) -> None:
    bodies = [sample_receipt("dup-mix", pos_id="POS-A" if i % 2 else "POS-B") for i in range(20)]
    results = await asyncio.gather(*(post(app, body) for body in bodies))
    statuses = [status for status, _ in results]
    assert statuses.count(201) == 1
    assert statuses.count(409) == 10 and statuses.count(200) == 9
    assert await app.row_count() == 1


# ---- group commit ----


async def test_concurrent_intakes_share_commits(app: App) -> None:
    results = await asyncio.gather(*(post(app, sample_receipt(f"group-{i}")) for i in range(200)))
    assert all(status == 201 for status, _ in results)
    assert app.store.counters.committed_rows == 200
    assert app.store.counters.commits < 200, "no commit was shared: every intake paid its own fsync"
    assert await app.row_count() == 200


# ---- capacity ----


async def test_buffer_full_is_503_and_adds_nothing(tmp_path: Path) -> None:
    app = await open_app(tmp_path, max_pending=3)
    try:
        for i in range(3):
            assert (await post(app, sample_receipt(f"cap-{i}")))[0] == 201
        response = await app.client.post("/v1/kkt/receipt", json=sample_receipt("cap-3"))
        answer = await response.json()
        assert response.status == 503
        assert answer["error"]["code"] == "buffer_full"
        assert int(response.headers["Retry-After"]) > 0
        assert await app.row_count() == 3
        # A replay of a stored receipt is still answered: it costs no capacity.
        assert (await post(app, sample_receipt("cap-1")))[0] == 200
    finally:
        await close_app(app)


async def test_capacity_holds_under_a_concurrent_burst(tmp_path: Path) -> None:
    app = await open_app(tmp_path, max_pending=10)
    try:
        results = await asyncio.gather(*(post(app, sample_receipt(f"burst-{i}")) for i in range(40)))
        statuses = [status for status, _ in results]
        assert statuses.count(201) == 10 and statuses.count(503) == 30
        assert await app.row_count() == 10
    finally:
        await close_app(app)


# ---- reads ----


async def test_get_receipt_and_not_found(app: App) -> None:
    _, created = await post(app, sample_receipt("get-1"))
    response = await app.client.get(f"/v1/kkt/receipt/{created['receipt_id']}")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "pending" and body["attempts"] == 0 and body["last_error"] is None
    assert body["idempotency_key"] == "get-1"
    assert body["receipt"]["items"][1]["sum"] == 6450  # computed when omitted
    assert body["ofd"] is None
    response = await app.client.get("/v1/kkt/receipt/0000")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_get_receipt_by_its_idempotency_key(app: App) -> None:
    """After a timeout the till knows its key, not kktd's id: the same answer as GET by id, contact masked."""
    _, created = await post(app, {**sample_receipt("key:lookup-1"), "customer_contact": "buyer@example.ru"})
    response = await app.client.get("/v1/kkt/receipt", params={"idempotency_key": "key:lookup-1"})
    assert response.status == 200
    by_key = await response.json()
    by_id = await (await app.client.get(f"/v1/kkt/receipt/{created['receipt_id']}")).json()
    assert by_key == by_id and by_key["receipt_id"] == created["receipt_id"]
    assert by_key["receipt"]["customer_contact"] == "b***@example.ru"


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "invalid_query"),
        ("?idempotency_key=", 400, "invalid_query"),
        ("?idempotency_key=a%20b", 400, "invalid_query"),
        ("?idempotency_key=" + "k" * 65, 400, "invalid_query"),
        ("?idempotency_key=never-posted", 404, "not_found"),
    ],
)
async def test_get_receipt_by_key_refuses_what_is_no_key(app: App, query: str, status: int, code: str) -> None:
    response = await app.client.get(f"/v1/kkt/receipt{query}")
    assert response.status == status
    assert (await response.json())["error"]["code"] == code


async def test_buffer_status(app: App) -> None:
    for i in range(3):
        await post(app, sample_receipt(f"st-{i}"))
    response = await app.client.get("/v1/kkt/buffer/status")
    status = await response.json()
    assert status["counts"] == {"pending": 3, "submitted": 0, "sent": 0, "failed": 0, "resolved": 0}
    assert status["capacity"] == 200_000
    assert status["fill_ratio"] == pytest.approx(3 / 200_000)
    assert 0 <= status["oldest_pending_age_s"] < 60
    assert status["db_size_bytes"] > 0


async def test_health_ok_and_503_when_writer_wedged(tmp_path: Path) -> None:
    app = await open_app(tmp_path, faults=True)
    try:
        response = await app.client.get("/v1/health")
        assert response.status == 200 and (await response.json())["status"] == "ok"
        response = await app.client.post("/v1/test/fault", json={"fault": "wedge_writer"})
        assert response.status == 202
        response = await app.client.get("/v1/health")
        body = await response.json()
        assert response.status == 503
        assert body["status"] == "error" and "database does not answer" in body["problems"][0]
    finally:
        await app.client.close()
        await app.store.close(timeout=1.0)  # the wedged job never finishes: do not wait out drain_timeout
        await app.stack.aclose()


async def test_fault_endpoint_is_absent_from_the_product(app: App) -> None:
    response = await app.client.post("/v1/test/fault", json={"fault": "wedge_writer"})
    assert response.status == 404


# ---- the database itself ----


async def test_pragmas_schema_and_directory(tmp_path: Path) -> None:
    buffer = await Store.open(tmp_path / "sub" / "buffer.db", 10)
    try:
        # Read back on the writer's own connection (these PRAGMAs are per connection): WAL + FULL, and no
        # automatic checkpoint, which would run inside the commit that crosses its threshold (issue 15: the
        # writer checkpoints between transactions, tested below).
        settings = {
            name: await buffer.run(functools.partial(_pragma, name=name))
            for name in ("journal_mode", "synchronous", "wal_autocheckpoint", "foreign_keys")
        }
        assert settings == {"journal_mode": "wal", "synchronous": 2, "wal_autocheckpoint": 0, "foreign_keys": 1}
    finally:
        await buffer.close()
    conn = sqlite3.connect(tmp_path / "sub" / "buffer.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    assert not (tmp_path / "sub" / "buffer.db-wal").exists()  # a clean close still checkpoints and removes it
    assert {name for name, _, _ in PRAGMAS} >= {
        "journal_mode",
        "synchronous",
        "wal_autocheckpoint",
        "foreign_keys",
        "busy_timeout",
    }


async def _pragma(conn: Any, name: str) -> Any:
    rows = await conn.execute_fetchall(f"PRAGMA {name}")
    return list(rows)[0][0]


async def accept_many(buffer: Store, prefix: str, count: int, concurrency: int = 50) -> None:
    for start in range(0, count, concurrency):
        receipts = [
            parse_receipt(json.dumps(sample_receipt(f"{prefix}-{i}")).encode(), None)
            for i in range(start, min(count, start + concurrency))
        ]
        results = await asyncio.gather(*(buffer.accept(r) for r in receipts))
        assert all(getattr(r, "created", False) for r in results)


async def test_checkpoints_run_between_transactions_and_keep_the_wal_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the automatic checkpoint off, the writer checkpoints between two transactions once the WAL holds
    CHECKPOINT_FRAMES frames not yet copied: pages reach the database file while intake goes on, and the WAL
    never holds more than CHECKPOINT_FORCE_FRAMES uncopied frames."""
    monkeypatch.setattr(wal, "CHECKPOINT_FRAMES", 100)
    monkeypatch.setattr(wal, "CHECKPOINT_FORCE_FRAMES", 400)
    path = tmp_path / "buffer.db"
    buffer = await Store.open(path, 100_000)
    uncopied: list[int] = []
    try:
        empty_size = path.stat().st_size
        for batch in range(20):
            await accept_many(buffer, f"ckpt{batch}", 50)
            await buffer.ping()  # the writer has passed its checkpoint point after the batch
            frames = frames_to_checkpoint(shm_path(path).read_bytes()[:WAL_INDEX_READ])
            assert frames is not None
            uncopied.append(frames)
        assert buffer.wal.checkpoints >= 2
        assert path.stat().st_size > empty_size  # pages reached the database file while kktd runs
    finally:
        await buffer.close()
    assert max(uncopied) < 400 + 100, uncopied  # the last batch's frames on top of the bound at most
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM receipts").fetchone()[0]
    assert rows == 20 * 50


async def test_commits_of_one_hand_their_checkpoint_to_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One till: every receipt commits by itself on the fast path, so the writer task never runs a batch; a
    checkpoint that falls due is queued for the writer, and the WAL stays bounded all the same."""
    monkeypatch.setattr(wal, "CHECKPOINT_FRAMES", 60)
    path = tmp_path / "buffer.db"
    buffer = await Store.open(path, 100_000)
    try:
        await accept_many(buffer, "one", 300, concurrency=1)
        await buffer.ping()
        assert buffer.wal.checkpoints >= 10
        page = await buffer.run(functools.partial(_pragma, name="page_size"))
        # Without checkpoints 300 receipts would leave well over a thousand frames in the WAL file.
        assert Path(f"{path}-wal").stat().st_size < 300 * (page + 24)
    finally:
        await buffer.close()


async def test_a_reader_holding_old_frames_does_not_make_every_batch_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader's snapshot (the integrity check after start-up reads for seconds on a large database) keeps
    a PASSIVE checkpoint from copying what it may still read. The writer then checkpoints again only once
    CHECKPOINT_FRAMES more frames came, not after every batch."""
    monkeypatch.setattr(wal, "CHECKPOINT_FRAMES", 50)
    path = tmp_path / "buffer.db"
    buffer = await Store.open(path, 100_000)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await accept_many(buffer, "first", 10)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM receipts").fetchone()[0] == 10  # the snapshot is held
        for batch in range(20):
            await accept_many(buffer, f"held{batch}", 25)
            await buffer.ping()
        frames = frames_to_checkpoint(shm_path(path).read_bytes()[:WAL_INDEX_READ])
        assert frames is not None and frames > 200, "the reader kept the checkpoints from copying"
        assert 1 <= buffer.wal.checkpoints <= frames // 50 + 1, (buffer.wal.checkpoints, frames)
    finally:
        reader.close()
        await buffer.close()


async def _checkpointed_store(path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store whose writer has just checkpointed everything: the next write starts a new WAL."""
    buffer = await Store.open(path, 100_000)
    await accept_many(buffer, "before", 50)
    monkeypatch.setattr(wal, "CHECKPOINT_FRAMES", 1)
    await buffer.ping()  # the writer checkpoints after this job (nothing else is queued)...
    await buffer.ping()  # ...and runs this one after its checkpoint
    assert buffer.wal.checkpoints == 1
    frames = frames_to_checkpoint(shm_path(path).read_bytes()[:WAL_INDEX_READ])
    assert frames == 0, "the checkpoint copied the whole WAL"
    return buffer


async def test_the_first_intake_after_a_checkpoint_carries_the_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new WAL's stamp costs no commit (no flush) of its own: it is in the same transaction as the first
    receipts written after the checkpoint, and that transaction is the new WAL's first."""
    path = tmp_path / "buffer.db"
    buffer = await _checkpointed_store(path, monkeypatch)
    try:
        result = await buffer.accept(parse_receipt(json.dumps(sample_receipt("after-ckpt")).encode(), None))
        assert getattr(result, "created", False)
        transactions = committed_transactions(wal_path(path).read_bytes())
        assert transactions is not None and len(transactions) == 1, "one transaction: stamp and receipt"
        pages = transactions[0]
        assert stamps_in(pages), "the first transaction of the new WAL holds the stamp"
        assert any(b"after-ckpt" in page for page in pages), "...and the receipt"
        assert check_wal(path).verdict is WalVerdict.OWN
    finally:
        await buffer.close()


async def test_a_job_first_after_a_checkpoint_stamps_before_it_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the first write after a checkpoint is a job (the sync loop recording a failed delivery), the
    stamp is committed first, alone: the job's write never starts a WAL without one."""
    path = tmp_path / "buffer.db"
    buffer = await _checkpointed_store(path, monkeypatch)
    try:
        pending = await buffer.pending_batch(1)
        await buffer.record_attempt_failure([pending[0].receipt_id], "timeout", 10, strike=True)
        transactions = committed_transactions(wal_path(path).read_bytes())
        assert transactions is not None and len(transactions) == 2, "the stamp, then the job's update"
        assert stamps_in(transactions[0])
        assert check_wal(path).verdict is WalVerdict.OWN
    finally:
        await buffer.close()


async def _true(value: bool) -> bool:
    return value


async def test_reopen_recovers_counts(tmp_path: Path) -> None:
    app = await open_app(tmp_path)
    for i in range(5):
        await post(app, sample_receipt(f"re-{i}"))
    await close_app(app)
    buffer = await Store.open(tmp_path / "buffer.db", 100)
    try:
        assert buffer.counts.pending == 5
    finally:
        await buffer.close()


def corrupt(path: Path) -> None:
    """Overwrite the middle of the file: pages of the table b-tree become garbage."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(4096)
        handle.write(os.urandom(max(4096, size - 8192)))


async def make_database(tmp_path: Path, receipts: int) -> Path:
    app = await open_app(tmp_path)
    await asyncio.gather(*(post(app, sample_receipt(f"c-{i}")) for i in range(receipts)))
    await close_app(app)
    return tmp_path / "buffer.db"


async def test_corrupt_database_is_refused_and_reported(tmp_path: Path) -> None:
    path = await make_database(tmp_path, 300)
    corrupt(path)
    before = path.read_bytes()
    with pytest.raises(CorruptDatabase):
        await Store.open(path, 1000)
    assert path.read_bytes() == before, "a corrupt database must never be rewritten or replaced"
    report = subprocess.run([str(KKTD_BIN), "check-db", str(path)], capture_output=True, text=True, timeout=60)
    assert report.returncode == 65
    assert "kktd check-db" in report.stderr


async def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    path.write_bytes(b"this is not sqlite" * 500)
    with pytest.raises(CorruptDatabase, match="damaged"):
        await Store.open(path, 10)


async def test_check_db_ok(tmp_path: Path) -> None:
    path = await make_database(tmp_path, 3)
    report = subprocess.run([str(KKTD_BIN), "check-db", str(path)], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "ok" in report.stdout


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = await make_database(tmp_path, 1)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StorageUnavailable, match="newer than this kktd"):
        await Store.open(path, 10)


# ---- a full disk (a real, tiny filesystem) ----


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    require(os.geteuid() == 0, "mounting a tiny tmpfs needs root")
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_disk_full_is_503_and_nothing_acknowledged_is_lost(tiny_fs: Path) -> None:
    app = await open_app(tiny_fs)
    acknowledged: list[str] = []
    refused = 0
    try:
        for i in range(3000):
            body = sample_receipt(f"full-{i}")
            body["items"][0]["name"] = f"Товар {i} " + "х" * 100
            response = await app.client.post("/v1/kkt/receipt", json=body)
            answer = await response.json()
            if response.status == 201:
                acknowledged.append(answer["receipt_id"])
            else:
                assert response.status == 503, answer
                assert answer["error"]["code"] == "storage_unavailable"
                assert "full" in answer["error"]["message"]
                refused += 1
                if refused >= 5:
                    break
        assert refused >= 5, "the tiny filesystem never filled up"
        assert acknowledged
        # The daemon keeps serving reads while the disk is full.
        response = await app.client.get(f"/v1/kkt/receipt/{acknowledged[-1]}")
        assert response.status == 200
    finally:
        await close_app(app)
    buffer = await Store.open(tiny_fs / "buffer.db", 100_000)
    try:
        for receipt_id in acknowledged:
            assert await buffer.get(receipt_id) is not None, f"acknowledged receipt {receipt_id} lost"
    finally:
        await buffer.close()


async def test_inserted_receipts_are_answered_even_if_a_later_lookup_fails(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group holding a new receipt and a replay: the insert commits, then looking up the replay's key
    fails. The new receipt was stored and must be answered 201, not 'not stored'."""
    from kktd.receipt import validate_receipt

    first = await app.store.accept(validate_receipt(sample_receipt("look-1")))
    real_existing = queries.existing_keys

    async def failing_existing(conn: Any, keys: list[str]) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(queries, "existing_keys", failing_existing)
    new, replay = await asyncio.gather(
        app.store.accept(validate_receipt(sample_receipt("look-2"))),
        app.store.accept(validate_receipt(sample_receipt("look-1"))),
        return_exceptions=True,
    )
    monkeypatch.setattr(queries, "existing_keys", real_existing)
    assert getattr(new, "created", False) is True
    assert isinstance(replay, StorageUnavailable)
    assert (await app.store.get(new.receipt_id)).status == "pending"  # type: ignore[union-attr]
    assert first is not None


async def test_cancelled_intake_on_the_fast_path_leaves_counts_true(tmp_path: Path) -> None:
    """An intake that finds the writer idle commits by itself; a caller cancelled in the middle of that
    commit cannot leave the capacity counters apart from the rows (the statement still commits in
    aiosqlite's thread, and the store recounts behind it)."""
    buffer = await Store.open(tmp_path / "buffer.db", 100)
    try:
        receipt = parse_receipt(json.dumps(sample_receipt("cancelled-1")).encode(), None)
        task = asyncio.ensure_future(buffer.accept(receipt))
        for _ in range(100):  # event-loop steps (no time passes): until the intake holds the connection
            if buffer._conn_lock.locked():
                break
            await asyncio.sleep(0)
        assert buffer._conn_lock.locked() and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await buffer.ping()  # behind the recount
        rows = await buffer.run(lambda conn: queries.count_by_status(conn))
        assert buffer.counts.pending == rows.pending == 1
        again = await buffer.accept(receipt)
        assert isinstance(again, Accepted) and not again.created  # the cancelled intake's row is there
    finally:
        await buffer.close()


async def test_slow_commits_gather_the_tills_they_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a slow disk the writer waits (boundedly) for the tills its last group commit answered, instead of
    committing the first receipt to come back alone. Forced here: every commit counts as slow and the bound
    is far away, so the order of events alone decides (no timing)."""
    monkeypatch.setattr(writer, "SLOW_COMMIT_S", 0.0)
    monkeypatch.setattr(writer, "GATHER_SHARE", 1e6)
    monkeypatch.setattr(writer, "GATHER_MAX_S", 30.0)
    buffer = await Store.open(tmp_path / "buffer.db", 100)

    def receipt(key: str) -> Any:
        return parse_receipt(json.dumps(sample_receipt(key)).encode(), None)

    try:
        # The first commits by itself (the writer was idle), the two behind it as one group.
        await asyncio.gather(*(buffer.accept(receipt(f"g-{n}")) for n in range(3)))
        assert buffer.counters.commits == 2
        first = asyncio.ensure_future(buffer.accept(receipt("g-3")))
        for _ in range(50):  # event-loop steps, no time: the writer waits for the second till
            await asyncio.sleep(0)
        assert not first.done() and buffer.counters.commits == 2
        second = await buffer.accept(receipt("g-4"))
        answers = [await first, second]
        assert all(isinstance(answer, Accepted) and answer.created for answer in answers)
        assert buffer.counters.commits == 3  # both in one commit
    finally:
        await buffer.close()
