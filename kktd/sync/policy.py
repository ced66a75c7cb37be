"""The delivery policy: which receipts go out next, how many at once, and when a failure is a receipt's own.

An upstream that is down must never cost receipts, so a failed delivery counts against a receipt (its
`attempts`) only when the receipt itself is shown to be the problem (a "poison" receipt): it failed in a
batch of its own, and the upstream acknowledged other receipts since its previous lone failure. To get
there, the batch size halves on every failure that may have reached the upstream, and a receipt that fails
alone is held back for a while so the receipts behind it keep flowing. Failures that cannot have reached
the upstream change nothing but the backoff (the loop does not even report them here).

A plain synchronous class with an injected clock: tested the way the breaker is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kktd.clock import Clock

MAX_HELD = 1000  # receipts held back at once; keeps the exclusion list far below SQLite's parameter limit


@dataclass(frozen=True, slots=True)
class FailureVerdict:
    strike: bool  # the failure counts against the (single) receipt of the batch


class DeliveryPolicy:
    def __init__(self, batch_size: int, hold_s: float, clock: Clock = time.monotonic) -> None:
        self.batch_size = batch_size
        self.batch_limit = batch_size
        self.generation = 0  # bumped by every failure that shrinks the batch limit
        # receipt_id -> monotonic time it may be sent again. A lone failure is held for `hold_s`: longer
        # than the retry wait (2 x backoff_max), so the receipts behind it get their turn.
        self.held: dict[str, float] = {}
        self._hold_s = hold_s
        self._clock = clock
        self._last_ack: float | None = None
        self._lone_failures: dict[str, float] = {}  # receipt_id -> time of its last lone failure
        self._suspects: set[str] = set()  # held receipts whose last lone failure counted against them

    # ---- what to send ----

    def exclusions(self) -> tuple[str, ...]:
        """Receipts not to send now (held back)."""
        self.expire_holds()
        return tuple(self.held)

    def probe_exclusions(self) -> tuple[str, ...] | None:
        """When only held receipts are left: the ones nothing points at are the best probe there is.
        None when every held receipt is a suspect (nothing to probe with)."""
        if len(self._suspects) < len(self.held):
            return tuple(self._suspects)
        return None

    def at_full_speed(self) -> bool:
        """Pipelining only when all is well: while probing for a poison receipt, one batch at a time, so a
        sibling's success cannot undo what a failure taught."""
        return self.batch_limit == self.batch_size

    def only_held_pending(self, pending: int) -> bool:
        self.expire_holds()
        return 0 < pending <= len(self._suspects)

    def idle_timeout(self, interval: float) -> float:
        """How long the loop may idle: the sync interval, or less if a hold ends sooner."""
        if self.held:
            return min(interval, max(0.01, min(self.held.values()) - self._clock()))
        return interval

    # ---- what the upstream said ----

    def on_success(self, generation: int) -> None:
        """A batch got answers. Only a batch sent after the last failure may grow the limit again: a sibling
        that was already on the wire says nothing about the receipts that failed."""
        if generation == self.generation:
            self.batch_limit = min(self.batch_size, self.batch_limit * 2)

    def on_answered(self, receipt_ids: Iterable[str]) -> None:
        """The upstream answered for these receipts: it works. Receipts held during a failure that nothing
        showed to be theirs (the upstream was failing everyone) go back in line at once."""
        self._last_ack = self._clock()
        for receipt_id in receipt_ids:
            self._lone_failures.pop(receipt_id, None)
        for receipt_id in [r for r in self.held if r not in self._suspects]:
            del self.held[receipt_id]

    def on_failure(self, receipt_ids: Sequence[str]) -> FailureVerdict:
        """A batch failed in a way that may have reached the upstream: shrink the batch; a lone receipt is
        held back, and struck if the upstream acknowledged others since its previous lone failure."""
        self.batch_limit = max(1, self.batch_limit // 2)
        self.generation += 1
        if len(receipt_ids) != 1:
            return FailureVerdict(strike=False)
        receipt_id = receipt_ids[0]
        now = self._clock()
        previous = self._lone_failures.get(receipt_id)
        strike = previous is not None and self._last_ack is not None and self._last_ack > previous
        self._lone_failures[receipt_id] = now
        self._hold(receipt_id, now + self._hold_s)
        if strike:
            self._suspects.add(receipt_id)
        else:
            self._suspects.discard(receipt_id)
        return FailureVerdict(strike=strike)

    def forget(self, receipt_ids: Iterable[str]) -> None:
        """These receipts left the pending set (dead-lettered): stop tracking them."""
        for receipt_id in receipt_ids:
            self.held.pop(receipt_id, None)
            self._lone_failures.pop(receipt_id, None)
            self._suspects.discard(receipt_id)

    # ---- holds ----

    def expire_holds(self) -> None:
        now = self._clock()
        for receipt_id in [r for r, until in self.held.items() if until <= now]:
            del self.held[receipt_id]
            self._suspects.discard(receipt_id)

    def _hold(self, receipt_id: str, until: float) -> None:
        if receipt_id not in self.held and len(self.held) >= MAX_HELD:
            soonest = min(self.held, key=self.held.__getitem__)
            del self.held[soonest]
            self._suspects.discard(soonest)
        self.held[receipt_id] = until


POLL_INTERVAL_S = 1.0  # by default a document's result is asked for at most once a second


class PollSchedule:
    """When each document a two-phase upstream registered may be polled next. Kept in memory: a document
    this process has not polled yet (registered before a restart) is first due one interval after the
    schedule was made, so that even a process killed right after a poll and restarted at once never asks
    about a document twice within the interval."""

    def __init__(self, clock: Clock = time.monotonic, interval: float = POLL_INTERVAL_S) -> None:
        self._clock = clock
        self._interval = interval
        self._unknown_due = clock() + interval
        self._next: dict[str, float] = {}

    def is_due(self, receipt_id: str) -> bool:
        return self._next.get(receipt_id, self._unknown_due) <= self._clock()

    def polled(self, receipt_ids: Iterable[str]) -> None:
        """These were asked about just now (or registered just now): not again within the interval."""
        due = self._clock() + self._interval
        for receipt_id in receipt_ids:
            self._next[receipt_id] = due

    def forget(self, receipt_ids: Iterable[str]) -> None:
        for receipt_id in receipt_ids:
            self._next.pop(receipt_id, None)

    def seconds_until_next(self) -> float:
        """How long until a document may be due (documents the schedule does not know yet included)."""
        now = self._clock()
        upcoming = list(self._next.values())
        if self._unknown_due > now:
            upcoming.append(self._unknown_due)
        return max(0.0, min(upcoming) - now) if upcoming else 0.0
