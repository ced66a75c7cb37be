"""The circuit breaker the sync loop puts in front of the upstream: synchronous, with an injected clock."""

from __future__ import annotations

import time
from collections.abc import Callable

from kktd.states import BreakerState

__all__ = ["BreakerState", "CircuitBreaker"]


class CircuitBreaker:
    """Consecutive-failure circuit breaker; synchronous and driven by an injectable clock.

    closed --(failure_threshold consecutive failures)--> open --(reset_timeout_s, on allow())-->
    half_open, which lets exactly one trial through: its success closes, its failure re-opens and
    restarts the timer. A trial whose outcome is never recorded (its caller was cancelled) is
    considered lost after another reset_timeout_s, and a new trial is allowed then, so the breaker
    cannot wedge in half_open.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout_s < 0:
            raise ValueError("reset_timeout_s must be >= 0")
        self._threshold = failure_threshold
        self._reset_timeout = float(reset_timeout_s)
        self._on_change = on_change
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_started_at: float | None = None

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """May a request go out now? In half_open, a True answer hands out the single trial."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self._reset_timeout:
                return False
            self._transition(BreakerState.HALF_OPEN)
        elif self._trial_started_at is not None and now < self._trial_started_at + self._reset_timeout:
            return False
        self._trial_started_at = now
        return True

    def record_success(self) -> None:
        # Any answer by the protocol proves the upstream works, whatever state we were in.
        self._failures = 0
        self._trial_started_at = None
        if self._state is not BreakerState.CLOSED:
            self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_started_at = None
        if self._state is BreakerState.CLOSED and self._failures < self._threshold:
            return
        # Opening, re-opening after a failed trial, or a late failure while open: wait a full period.
        self._opened_at = self._clock()
        if self._state is not BreakerState.OPEN:
            self._transition(BreakerState.OPEN)

    def trial_now(self) -> None:
        """An operator asked for delivery now (`kktd sync-now`): the next allow() hands out the half-open
        trial at once instead of after the reset timer; its outcome closes or re-opens as any trial's."""
        if self._state is BreakerState.CLOSED:
            return
        self._trial_started_at = None
        if self._state is BreakerState.OPEN:
            self._transition(BreakerState.HALF_OPEN)

    def reset(self) -> None:
        """Forget every failure: the upstream's settings changed, and the old failures say nothing of the new."""
        self._failures = 0
        self._trial_started_at = None
        if self._state is not BreakerState.CLOSED:
            self._transition(BreakerState.CLOSED)

    def retry_after(self) -> float:
        """Seconds until allow() would return True (0.0 when it would now)."""
        if self._state is BreakerState.CLOSED:
            return 0.0
        if self._state is BreakerState.OPEN:
            start = self._opened_at
        elif self._trial_started_at is None:
            return 0.0
        else:
            start = self._trial_started_at
        return max(0.0, start + self._reset_timeout - self._clock())

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if self._on_change is not None:
            self._on_change(old, new)
