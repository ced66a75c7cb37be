"""Schema v2 and the two-phase path of the sync loop (submit -> reference committed -> poll -> result),
in process against a scripted two-phase upstream and a fake clock: every rule, in milliseconds.

The real two-phase upstream (ATOL Online v5) is tested against its mock in its own suites; this file pins
down what the store and the loop promise to any two-phase upstream."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kktd.delivery import (
    AwaitingResult,
    FailureKind,
    FiscalData,
    Fiscalized,
    NotRegistered,
    Outgoing,
    PollOutcome,
    Refused,
    Registered,
    StillProcessing,
    SubmitOutcome,
    Undelivered,
    UpstreamUnavailable,
)
from kktd.receipt import sample_receipt, validate_receipt
from kktd.store import SCHEMA_VERSION, ReceiptStatus, Store
from kktd.store.schema import MIGRATIONS
from kktd.sync import CircuitBreaker, SyncLoop
from tests.conftest import App, AppFactory
from tests.support import FakeTime


@dataclasses.dataclass
class Document:
    uuid: str
    external_id: str
    receipt_id: str
    polls_left: int
    fail_unregistered: bool = False


class ScriptedTwoPhase:
    """A two-phase upstream that deduplicates on external_id (as ATOL does: a known id answers with the
    original uuid) and records every call with the fake clock's time."""

    name: ClassVar[str] = "scripted-two-phase"
    two_phase: ClassVar[bool] = True
    max_batch = 50

    def __init__(self, clock: FakeTime, waits: int = 0) -> None:
        self.clock = clock
        self.waits = waits
        self.documents: dict[str, Document] = {}  # by external_id
        self.registrations: Counter[str] = Counter()  # documents created per external_id
        self.polls: list[tuple[float, str]] = []
        self.refuse: set[str] = set()  # idempotency keys whose content is refused
        self.not_registered_once: set[str] = set()  # external ids whose document fails unregistered
        self.refuse_on_poll: set[str] = set()  # external ids whose registered document is reported failed
        self.unavailable: UpstreamUnavailable | None = None
        self.undelivered: set[str] = set()  # receipt ids whose own call fails
        self.seen_external_ids: list[str] = []
        self.before_submit: Any = None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, batch: Sequence[Outgoing]) -> list[SubmitOutcome]:
        if self.unavailable is not None:
            raise self.unavailable
        if self.before_submit is not None:
            await self.before_submit(batch)
        outcomes: list[SubmitOutcome] = []
        for item in batch:
            self.seen_external_ids.append(item.external_id)
            if item.receipt_id in self.undelivered:
                outcomes.append(Undelivered(item.receipt_id, UpstreamUnavailable(FailureKind.MAYBE_SENT, "timeout")))
                continue
            if item.idempotency_key in self.refuse:
                outcomes.append(Refused(item.receipt_id, "32", "receipt failed validation"))
                continue
            doc = self.documents.get(item.external_id)
            if doc is None:
                doc = Document(
                    f"uuid-{len(self.documents) + 1}",
                    item.external_id,
                    item.receipt_id,
                    self.waits,
                    item.external_id in self.not_registered_once,
                )
                self.documents[item.external_id] = doc
                self.registrations[item.external_id] += 1
            outcomes.append(Registered(item.receipt_id, doc.uuid))
        return outcomes

    async def poll(self, awaiting: Sequence[AwaitingResult]) -> list[PollOutcome]:
        if self.unavailable is not None:
            raise self.unavailable
        outcomes: list[PollOutcome] = []
        for item in awaiting:
            self.polls.append((self.clock.now, item.reference))
            doc = self.documents[item.external_id]
            assert doc.uuid == item.reference
            if doc.polls_left > 0:
                doc.polls_left -= 1
                outcomes.append(StillProcessing(item.receipt_id))
            elif doc.fail_unregistered:
                outcomes.append(NotRegistered(item.receipt_id, "-1", "timed out in the queue"))
            elif item.external_id in self.refuse_on_poll:
                outcomes.append(Refused(item.receipt_id, "2007", "INN of the seller does not match the FN"))
            else:
                number = list(self.documents).index(item.external_id) + 1
                outcomes.append(
                    Fiscalized(
                        item.receipt_id,
                        FiscalData(
                            number,
                            f"{number * 7919:010d}",
                            "12.04.2026 20:16:00",
                            fn_number="9999078900012345",
                            shift_number=23,
                            receipt_number=number,
                            kkt_registration_number="0000111118041361",
                            ofd_receipt_url=f"https://check.example/{doc.uuid}",
                        ),
                    )
                )
        return outcomes


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


async def two_phase_app(app_factory: AppFactory, clock: FakeTime, upstream: ScriptedTwoPhase) -> App:
    app = await app_factory()
    config = app.kktd.config
    # The loop is rebuilt around the scripted upstream with the fake clock (the poll schedule, the policy's
    # holds and the breaker's reset timer all read it).
    breaker = CircuitBreaker(config.breaker_threshold, config.breaker_reset, clock=clock)
    app.kktd.sync = SyncLoop(app.store, upstream, breaker, config, clock=clock)
    app.services.sync = app.kktd.sync
    return app


async def accept(store: Store, key: str) -> str:
    result = await store.accept(validate_receipt(sample_receipt(key)))
    return result.receipt_id


async def test_registered_documents_are_polled_once_a_second_until_done(
    app_factory: AppFactory, clock: FakeTime
) -> None:
    upstream = ScriptedTwoPhase(clock, waits=3)
    app = await two_phase_app(app_factory, clock, upstream)
    ids = [await accept(app.store, f"tp-{i}") for i in range(120)]
    first = await app.kktd.sync.run_once_now()
    assert first.delivered == 0 and app.store.counts.submitted == 120 and app.store.counts.pending == 0
    row = await app.store.get(ids[0])
    assert row is not None and row.status == ReceiptStatus.SUBMITTED and row.registration.reference == "uuid-1"
    for _ in range(10):  # polls in the same second do nothing
        await app.kktd.sync.run_once_now()
    assert upstream.polls == []
    while app.store.counts.submitted:
        clock.now += 0.25
        await app.kktd.sync.run_once_now()
    assert app.store.counts.sent == 120
    assert set(upstream.registrations.values()) == {1} and len(upstream.registrations) == 120
    by_document: dict[str, list[float]] = {}
    for at, reference in upstream.polls:
        by_document.setdefault(reference, []).append(at)
    assert all(len(times) == 4 for times in by_document.values())  # 3 x wait, then done
    gaps = [b - a for times in by_document.values() for a, b in zip(times, times[1:])]
    assert min(gaps) >= 1.0, "a document was polled twice within a second"
    shown = await (await app.client.get(f"/v1/kkt/receipt/{ids[0]}")).json()
    assert shown["status"] == "sent" and shown["upstream"]["reference"] == "uuid-1"
    assert shown["ofd"]["fn_number"] == "9999078900012345" and shown["ofd"]["shift_number"] == 23
    assert shown["ofd"]["kkt_registration_number"] == "0000111118041361"
    assert shown["ofd"]["ofd_receipt_url"] == "https://check.example/uuid-1"


async def test_a_submitted_receipt_is_never_registered_again(app_factory: AppFactory, clock: FakeTime) -> None:
    upstream = ScriptedTwoPhase(clock, waits=1000)
    app = await two_phase_app(app_factory, clock, upstream)
    for i in range(10):
        await accept(app.store, f"once-{i}")
    for _ in range(20):
        clock.now += 1.0
        await app.kktd.sync.run_once_now()
    assert len(upstream.seen_external_ids) == 10, "a submitted receipt was submitted again"
    assert app.store.counts.submitted == 10


async def test_not_registered_is_registered_again_under_a_new_external_id_committed_first(
    app_factory: AppFactory, clock: FakeTime, tmp_path: Path
) -> None:
    upstream = ScriptedTwoPhase(clock)
    upstream.not_registered_once = {"nr-0"}
    app = await two_phase_app(app_factory, clock, upstream)
    receipt_id = await accept(app.store, "nr-0")
    committed: list[str] = []

    async def check_committed(batch: Sequence[Outgoing]) -> None:
        # What the database holds (read by another connection) when the registration goes out.
        conn = sqlite3.connect(tmp_path / "buffer.db")
        try:
            for item in batch:
                committed.append(
                    conn.execute(
                        "SELECT coalesce(external_id, idempotency_key) FROM receipts WHERE receipt_id = ?",
                        (item.receipt_id,),
                    ).fetchone()[0]
                )
        finally:
            conn.close()

    upstream.before_submit = check_committed
    while app.store.counts.sent == 0:
        clock.now += 1.0
        await app.kktd.sync.run_once_now()
    assert upstream.seen_external_ids == ["nr-0", "nr-0~1"]
    assert committed == ["nr-0", "nr-0~1"], "the new external id was not committed before it was sent"
    row = await app.store.get(receipt_id)
    assert row is not None and row.registration.external_id == "nr-0~1" and row.registration.registrations == 1
    assert row.status == ReceiptStatus.SENT and row.registration.reference == "uuid-2"


async def test_a_lost_registration_answer_adopts_the_original_document(
    app_factory: AppFactory, clock: FakeTime
) -> None:
    """The upstream registered the document but the answer never reached kktd (here: the loop dies before
    recording it). The retry goes out under the same external id, and the upstream's deduplication hands
    back the original document: one document, one fiscalization."""
    upstream = ScriptedTwoPhase(clock)
    app = await two_phase_app(app_factory, clock, upstream)
    await accept(app.store, "lost-0")
    outgoing = [
        Outgoing(r.receipt_id, r.idempotency_key, r.external_id, r.accepted_ms, r.body)
        for r in await app.store.pending_batch(10)
    ]
    await upstream.submit(outgoing)  # registered upstream, answer "lost": nothing recorded
    assert app.store.counts.pending == 1
    while app.store.counts.sent == 0:
        clock.now += 1.0
        await app.kktd.sync.run_once_now()
    assert upstream.registrations == Counter({"lost-0": 1})


async def test_refused_content_is_a_dead_letter_and_undelivered_waits(app_factory: AppFactory, clock: FakeTime) -> None:
    upstream = ScriptedTwoPhase(clock)
    upstream.refuse = {"bad-0"}
    app = await two_phase_app(app_factory, clock, upstream)
    bad = await accept(app.store, "bad-0")
    flaky = await accept(app.store, "flaky-0")
    good = await accept(app.store, "good-0")
    upstream.undelivered = {flaky}
    for _ in range(3):
        clock.now += 1.0
        await app.kktd.sync.run_once_now()
    assert (await app.store.get(bad)).status == ReceiptStatus.FAILED  # type: ignore[union-attr]
    assert (await app.store.get(good)).status == ReceiptStatus.SENT  # type: ignore[union-attr]
    waiting = await app.store.get(flaky)
    assert waiting is not None and waiting.status == ReceiptStatus.PENDING and waiting.last_error == "timeout"
    upstream.undelivered = set()
    clock.now += 1.0
    await app.kktd.sync.run_once_now()
    clock.now += 1.0
    await app.kktd.sync.run_once_now()
    assert (await app.store.get(flaky)).status == ReceiptStatus.SENT  # type: ignore[union-attr]


async def test_an_upstream_that_refuses_kktd_itself_warns_and_dead_letters_nothing(
    app_factory: AppFactory, clock: FakeTime
) -> None:
    upstream = ScriptedTwoPhase(clock)
    upstream.unavailable = UpstreamUnavailable(
        FailureKind.NOT_SENT, "auth_failed", operator_action="wrong login or password: fix atol_login"
    )
    app = await two_phase_app(app_factory, clock, upstream)
    for i in range(5):
        await accept(app.store, f"auth-{i}")
    for _ in range(5):
        result = await app.kktd.sync.run_once_now()
        assert result.error is not None and "auth_failed" in result.error
    health = await (await app.client.get("/v1/health")).json()
    assert health["status"] == "warning"
    assert any("wrong login or password" in w for w in health["warnings"]), health
    assert app.store.counts.pending == 5 and app.store.counts.failed == 0
    upstream.unavailable = None
    while app.store.counts.sent < 5:
        clock.now += 1.0
        await app.kktd.sync.run_once_now()
    health = await (await app.client.get("/v1/health")).json()
    assert not any("wrong login" in w for w in health["warnings"]), health


# ---- schema v2 ----


def make_v1_database(path: Path, pending: int, sent: int) -> None:
    """A buffer as kktd's schema v1 left it: pending receipts and sent ones with their acknowledgement."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    for n in range(pending + sent):
        receipt = validate_receipt(sample_receipt(f"v1-{n}"))
        status = "sent" if n < sent else "pending"
        conn.execute(
            "INSERT INTO receipts (receipt_id, idempotency_key, body_hash, body, pos_id, total, status, "
            "accepted_ms, updated_ms, sent_ms, fiscal_document_number, fiscal_sign, ofd_received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                f"{n:032x}",
                receipt.idempotency_key,
                receipt.body_hash,
                receipt.canonical_json,
                receipt.pos_id,
                receipt.total,
                status,
                1_700_000_000_000 + n,
                1_700_000_000_000 + n,
                1_700_000_001_000 if status == "sent" else None,
                n + 1 if status == "sent" else None,
                f"{n:010d}" if status == "sent" else None,
                "2026-11-24T00:00:00.000Z" if status == "sent" else None,
            ),
        )
    conn.commit()
    conn.close()


async def test_a_v1_database_migrates_to_v2_keeping_every_receipt(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    make_v1_database(path, pending=30, sent=20)
    store = await Store.open(path, 1000)
    try:
        assert (store.counts.pending, store.counts.submitted, store.counts.sent) == (30, 0, 20)
        pending = await store.pending_batch(100)
        assert [p.idempotency_key for p in pending] == [f"v1-{n}" for n in range(20, 50)]
        assert all(p.external_id == p.idempotency_key for p in pending)
        sent = await store.get(f"{0:032x}")
        assert sent is not None and sent.fiscal is not None and sent.fiscal.fiscal_document_number == 1
        assert sent.registration.external_id == "v1-0" and sent.registration.reference is None
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert (
        conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    )  # v3: the WAL identity; v4: FNS site and OFD INN
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"receipts_pending", "receipts_submitted", "receipts_failed", "receipts_sent_age"} <= indexes
    with pytest.raises(sqlite3.IntegrityError):  # the status constraint still holds, with the new state
        conn.execute("UPDATE receipts SET status = 'bogus' WHERE seq = 1")
    conn.close()


async def test_a_migrated_v1_buffer_drains_through_a_two_phase_upstream(
    app_factory: AppFactory, clock: FakeTime, tmp_path: Path
) -> None:
    make_v1_database(tmp_path / "buffer.db", pending=25, sent=5)
    upstream = ScriptedTwoPhase(clock, waits=1)
    app = await two_phase_app(app_factory, clock, upstream)
    while app.store.counts.sent < 30:
        clock.now += 1.0
        await app.kktd.sync.run_once_now()
    assert sorted(upstream.registrations) == sorted(f"v1-{n}" for n in range(5, 30))
    assert set(upstream.registrations.values()) == {1}
    body = json.loads((await app.store.get(f"{7:032x}")).body)  # type: ignore[union-attr]
    assert body["total"] == 24430


async def test_requeue_registers_a_document_the_upstream_failed_under_a_new_external_id(
    app_factory: AppFactory, clock: FakeTime
) -> None:
    """A dead letter refused at submission was never registered: requeued, it goes out under the same
    external id. One the upstream registered and then reported failed would only adopt that failed document
    again under its old id: requeued, it goes out under a new one."""
    upstream = ScriptedTwoPhase(clock)
    upstream.refuse = {"rq-submit"}
    upstream.refuse_on_poll = {"rq-poll"}
    app = await two_phase_app(app_factory, clock, upstream)
    at_submit = await accept(app.store, "rq-submit")
    at_poll = await accept(app.store, "rq-poll")
    while app.store.counts.failed < 2:
        clock.now += 1.0
        await app.kktd.sync.run_once_now()
    upstream.refuse, upstream.refuse_on_poll = set(), set()
    for receipt_id in (at_submit, at_poll):
        response = await app.client.post(f"/v1/kkt/dlq/{receipt_id}/requeue")
        assert response.status == 200
    while app.store.counts.sent < 2:
        clock.now += 1.0
        await app.kktd.sync.run_once_now()
    submit_row, poll_row = await app.store.get(at_submit), await app.store.get(at_poll)
    assert submit_row is not None and submit_row.registration.external_id == "rq-submit"
    assert poll_row is not None and poll_row.registration.external_id == "rq-poll~1"
    assert upstream.registrations == Counter({"rq-submit": 1, "rq-poll": 1, "rq-poll~1": 1})
