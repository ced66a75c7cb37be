"""kktd's Prometheus metrics (`GET /metrics`), with prometheus-client on a registry of kktd's own.

Two kinds of metric live here:
- events, counted where they happen: the API, the store and the sync loop call the small typed methods of
  :class:`Metrics` (an intake answered, a group committed, an upstream call and its outcomes, a retry);
- state, read at scrape time from one callable that returns a :class:`StateSnapshot` built from in-memory
  counters (the writer's counts, the breaker, the last delivery). A scrape never queries SQLite and never
  waits for the writer: it costs a few stat() calls and formatting, so it cannot slow intake.

Metric names are a contract with the shipped dashboard and alert rules (packaging/monitoring/); renaming
one means changing those and their tests too.
"""

from __future__ import annotations

import asyncio
import enum
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from kktd.delivery import (
    FailureKind,
    Fiscalized,
    NotRegistered,
    Refused,
    Registered,
    RegisterReport,
    ShiftState,
    StillProcessing,
    Undelivered,
)
from kktd.errors import ErrorCode
from kktd.states import BreakerState, pending_age_s
from kktd.store.rows import ReceiptStatus

__all__ = [
    "CONTENT_TYPE",
    "RECEIPT_STATUSES",
    "BREAKER_STATES",
    "INTAKE_BUCKETS",
    "GROUP_BUCKETS",
    "UPSTREAM_BUCKETS",
    "LAG_BUCKETS",
    "ReceiptOutcome",
    "RequestOutcome",
    "StateSnapshot",
    "Metrics",
    "receipt_outcome",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

RECEIPT_STATUSES = tuple(ReceiptStatus)
BREAKER_STATES = tuple(BreakerState)

# Intake: a group commit on an SSD takes a fraction of a millisecond; an old SD card's fsync takes tens to
# hundreds of milliseconds, and a dying one seconds. Fine steps at the bottom, long tail at the top.
INTAKE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Group commits hold 1..MAX_GROUP (512) intakes.
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Upstream calls: tens of milliseconds on a good line, up to the request timeout (10 s default) on a bad one.
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Event-loop lag: anything past a few milliseconds is a till waiting.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

LAG_PROBE_INTERVAL_S = 0.5

# Label values come from kktd's own vocabulary (error codes, upstream names); the check keeps a bug from
# ever turning attacker text into an unbounded set of series.
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{1,64}")


def _label(value: str) -> str:
    return value if _LABEL_VALUE.fullmatch(value) else "other"


class ReceiptOutcome(enum.StrEnum):
    """What an upstream said about one receipt."""

    FISCALIZED = "fiscalized"
    REFUSED = "refused"
    REGISTERED = "registered"
    STILL_PROCESSING = "still_processing"
    NOT_REGISTERED = "not_registered"
    UNDELIVERED = "undelivered"


_OUTCOME_OF: dict[type, ReceiptOutcome] = {
    Fiscalized: ReceiptOutcome.FISCALIZED,
    Refused: ReceiptOutcome.REFUSED,
    Registered: ReceiptOutcome.REGISTERED,
    StillProcessing: ReceiptOutcome.STILL_PROCESSING,
    NotRegistered: ReceiptOutcome.NOT_REGISTERED,
    Undelivered: ReceiptOutcome.UNDELIVERED,
}


def receipt_outcome(outcome: object) -> ReceiptOutcome:
    """The outcome label of an upstream's SubmitOutcome / PollOutcome."""
    return _OUTCOME_OF[type(outcome)]


class RequestOutcome(enum.StrEnum):
    """How one call to the upstream ended: answered, or failed in one of the upstream interface's kinds."""

    OK = "ok"
    NOT_SENT = FailureKind.NOT_SENT.value
    MAYBE_SENT = FailureKind.MAYBE_SENT.value
    BAD_ANSWER = FailureKind.BAD_ANSWER.value

    @classmethod
    def failed(cls, kind: FailureKind) -> RequestOutcome:
        return cls(kind.value)


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """What a scrape reports about the daemon's state, from memory only (see the module docstring)."""

    receipts: Mapping[str, int]  # status -> count, from the writer's counters
    capacity: int  # max_pending
    oldest_pending_ms: int | None  # accepted_ms of the oldest receipt not sent yet (pending or submitted)
    db_path: Path
    upstream: str
    breaker_state: BreakerState
    last_delivery_ms: int | None  # when the upstream last acknowledged anything
    pending_warn_age_s: float
    pending_critical_age_s: float
    version: str = ""
    journal_fallbacks: int = 0  # log records that reached the journal without their fields
    register: RegisterReport | None = None  # a register upstream's last report (None for other upstreams)


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class StateCollector(Collector):
    """Gauges computed at scrape time from one snapshot callable: no query, no writer round trip."""

    def __init__(self, snapshot: Callable[[], StateSnapshot], now_ms: Callable[[], int]) -> None:
        self._snapshot = snapshot
        self._now_ms = now_ms

    def describe(self) -> Iterable[Metric]:
        # Names only; without this the registry would call collect() (and the snapshot) at registration.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        snapshot = self._snapshot()
        return list(self._families(snapshot))

    def _families(self, s: StateSnapshot | None = None) -> Iterator[Metric]:
        receipts = GaugeMetricFamily("kktd_receipts", "Receipts in the buffer, by status", labels=["status"])
        capacity = GaugeMetricFamily("kktd_buffer_capacity", "Undelivered receipts the buffer may hold (max_pending)")
        oldest = GaugeMetricFamily(
            "kktd_oldest_pending_age_seconds", "Age of the oldest pending receipt (0 when none is pending)"
        )
        warn = GaugeMetricFamily("kktd_pending_warn_age_seconds", "pending_warn_age from the config")
        critical = GaugeMetricFamily("kktd_pending_critical_age_seconds", "pending_critical_age from the config")
        breaker = GaugeMetricFamily(
            "kktd_upstream_breaker_state", "Circuit breaker state (1 for the current one)", labels=["upstream", "state"]
        )
        last = GaugeMetricFamily(
            "kktd_upstream_last_delivery_timestamp_seconds",
            "When the upstream last acknowledged a receipt (absent before the first)",
            labels=["upstream"],
        )
        db_size = GaugeMetricFamily("kktd_database_size_bytes", "Size of the buffer database file")
        wal_size = GaugeMetricFamily("kktd_database_wal_size_bytes", "Size of the database's write-ahead log")
        disk_free = GaugeMetricFamily("kktd_storage_free_bytes", "Bytes free to kktd on the filesystem of the database")
        disk_size = GaugeMetricFamily("kktd_storage_size_bytes", "Size of the filesystem of the database")
        info = InfoMetricFamily("kktd", "kktd version and upstream")
        fallbacks = CounterMetricFamily(
            "kktd_journal_fallbacks",
            "Log records written to stderr because the journal's socket could not take them (no structured fields)",
        )
        register = _RegisterFamilies()
        families: list[Metric] = [
            receipts,
            capacity,
            oldest,
            warn,
            critical,
            breaker,
            last,
            db_size,
            wal_size,
            disk_free,
            disk_size,
            info,
            fallbacks,
            *register.families(),
        ]
        if s is None:
            yield from families
            return
        for status in RECEIPT_STATUSES:
            receipts.add_metric([status], s.receipts.get(status, 0))
        capacity.add_metric([], s.capacity)
        now = self._now_ms()
        oldest.add_metric([], pending_age_s(s.oldest_pending_ms, now) or 0.0)
        warn.add_metric([], s.pending_warn_age_s)
        critical.add_metric([], s.pending_critical_age_s)
        upstream = _label(s.upstream)
        for state in BREAKER_STATES:
            breaker.add_metric([upstream, state], 1.0 if s.breaker_state == state else 0.0)
        if s.last_delivery_ms is not None:
            last.add_metric([upstream], s.last_delivery_ms / 1000)
        db_size.add_metric([], _file_size(s.db_path))
        wal_size.add_metric([], _file_size(Path(f"{s.db_path}-wal")))
        try:
            fs = os.statvfs(s.db_path.parent)
        except OSError:
            pass
        else:
            disk_free.add_metric([], fs.f_bavail * fs.f_frsize)
            disk_size.add_metric([], fs.f_blocks * fs.f_frsize)
        info.add_metric([], {"version": s.version, "upstream": upstream})
        fallbacks.add_metric([], s.journal_fallbacks)
        if s.register is not None:
            register.add(s.register, now)
        yield from families


class _RegisterFamilies:
    """A local register's own truth (present only when the upstream is a register and it has reported)."""

    def __init__(self) -> None:
        self.unsent = GaugeMetricFamily(
            "kktd_register_unsent_documents", "Documents the register's FN has not yet got to the OFD"
        )
        self.oldest = GaugeMetricFamily(
            "kktd_register_oldest_unsent_age_seconds",
            "Age of the oldest document the register has not sent to the OFD (0 when none; the FN stops at 30 days)",
        )
        self.fn_valid = GaugeMetricFamily(
            "kktd_register_fn_valid_until_timestamp_seconds", "When the register's FN expires"
        )
        self.paper = GaugeMetricFamily("kktd_register_paper_present", "1 when the register has paper")
        self.shift_open = GaugeMetricFamily(
            "kktd_register_shift_state", "The register's shift (1 for the current state)", labels=["state"]
        )

    def families(self) -> list[Metric]:
        return [self.unsent, self.oldest, self.fn_valid, self.paper, self.shift_open]

    def add(self, report: RegisterReport, now: int) -> None:
        self.unsent.add_metric([], report.unsent_documents)
        self.oldest.add_metric([], pending_age_s(report.oldest_unsent_ms, now) or 0.0)
        if report.fn_valid_until_ms is not None:
            self.fn_valid.add_metric([], report.fn_valid_until_ms / 1000)
        self.paper.add_metric([], 1.0 if report.paper_present else 0.0)
        for state in ShiftState:
            self.shift_open.add_metric([state.value], 1.0 if report.shift.state is state else 0.0)


class Metrics:
    """Every kktd metric, on its own registry; the parts call the typed methods below."""

    def __init__(self, now_ms: Callable[[], int] | None = None, process: bool = True) -> None:
        # The *_created series would double every scrape for nothing the dashboard or the alerts use
        # (prometheus-client's switch is process-wide; kktd is the only user of the library in its process).
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self._now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        r = self.registry
        self._accepted = Counter("kktd_receipts_accepted", "Receipts stored (201)", registry=r)
        self._replayed = Counter(
            "kktd_receipts_replayed",
            "Receipts answered from an earlier intake with the same idempotency key (200)",
            registry=r,
        )
        self._rejected = Counter("kktd_receipts_rejected", "Receipts refused, by error code", ["code"], registry=r)
        # Every code of kktd's own from the start: the dashboard's panels show 0, not "No data", on a till that
        # has refused nothing yet (an upstream's own intake codes: prepare_rejections).
        for code in ErrorCode:
            self._rejected.labels(code.value)
        self._intake = Histogram(
            "kktd_intake_duration_seconds",
            "From the request to its answer, for receipts stored or replayed",
            buckets=INTAKE_BUCKETS,
            registry=r,
        )
        self._group = Histogram(
            "kktd_group_commit_size", "Receipts per group commit", buckets=GROUP_BUCKETS, registry=r
        )
        self._requests = Counter(
            "kktd_upstream_requests", "Calls to the upstream, by outcome", ["upstream", "outcome"], registry=r
        )
        self._request_latency = Histogram(
            "kktd_upstream_request_duration_seconds",
            "Duration of one call to the upstream",
            ["upstream"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self._deliveries = Counter(
            "kktd_upstream_receipts",
            "Receipts the upstream answered for, by outcome",
            ["upstream", "outcome"],
            registry=r,
        )
        self._retries = Counter(
            "kktd_upstream_retries", "Delivery cycles retried after a failure", ["upstream"], registry=r
        )
        self._lag = Histogram(
            "kktd_event_loop_lag_seconds", "Scheduling delay of the event loop", buckets=LAG_BUCKETS, registry=r
        )
        self._lag_last = Gauge("kktd_event_loop_lag_last_seconds", "The last event-loop lag measured", registry=r)
        self._state: StateCollector | None = None
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    # ---- intake (API and store) ----

    def intake_accepted(self, seconds: float) -> None:
        self._accepted.inc()
        self._intake.observe(seconds)

    def intake_replayed(self, seconds: float) -> None:
        self._replayed.inc()
        self._intake.observe(seconds)

    def intake_rejected(self, code: str) -> None:
        self._rejected.labels(_label(code)).inc()

    def group_committed(self, size: int) -> None:
        self._group.observe(size)

    # ---- upstream (sync loop) ----

    def upstream_request(self, upstream: str, outcome: RequestOutcome, seconds: float) -> None:
        name = _label(upstream)
        self._requests.labels(name, outcome.value).inc()
        self._request_latency.labels(name).observe(seconds)

    def upstream_outcomes(self, upstream: str, outcomes: Sequence[object]) -> None:
        """Count one call's per-receipt outcomes (Fiscalized, Refused, Registered, ...)."""
        name = _label(upstream)
        tally: dict[ReceiptOutcome, int] = {}
        for outcome in outcomes:
            label = receipt_outcome(outcome)
            tally[label] = tally.get(label, 0) + 1
        for label, count in tally.items():
            self._deliveries.labels(name, label.value).inc(count)

    def upstream_receipts(self, upstream: str, outcome: ReceiptOutcome, count: int = 1) -> None:
        if count:
            self._deliveries.labels(_label(upstream), outcome.value).inc(count)

    def upstream_retry(self, upstream: str) -> None:
        self._retries.labels(_label(upstream)).inc()

    def prepare_rejections(self, codes: Iterable[str]) -> None:
        """The upstream's own intake codes from the start too (its registry entry names them)."""
        for code in codes:
            self._rejected.labels(code)

    def prepare_upstream(self, upstream: str) -> None:
        """Create the upstream's series at zero, so rates and alerts see them before the first event."""
        name = _label(upstream)
        for outcome in RequestOutcome:
            self._requests.labels(name, outcome.value)
        for receipt in ReceiptOutcome:
            self._deliveries.labels(name, receipt.value)
        self._request_latency.labels(name)
        self._retries.labels(name)

    # ---- state, read at scrape time ----

    def bind_state(self, snapshot: Callable[[], StateSnapshot]) -> None:
        """Register the state gauges; `snapshot` must read memory only (it runs on every scrape)."""
        if self._state is not None:
            self.registry.unregister(self._state)
        self._state = StateCollector(snapshot, self._now_ms)
        self.registry.register(self._state)

    # ---- event loop ----

    def event_loop_lag(self, seconds: float) -> None:
        self._lag.observe(seconds)
        self._lag_last.set(seconds)

    async def watch_event_loop(self, interval: float = LAG_PROBE_INTERVAL_S) -> None:
        """Forever: sleep `interval` and record how late the loop woke us (a blocked loop shows up here)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            self.event_loop_lag(max(0.0, loop.time() - started - interval))

    # ---- exposition ----

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (what `GET /metrics` answers)."""
        return generate_latest(self.registry)
