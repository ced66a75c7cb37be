"""CircuitBreaker state machine, driven by a fake clock (no sleeping, fully deterministic)."""

from __future__ import annotations

import random

import pytest

from kktd.sync import BreakerState, CircuitBreaker
from tests.support import FakeTime

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[BreakerState, BreakerState]] = []

    def __call__(self, old: BreakerState, new: BreakerState) -> None:
        self.changes.append((old, new))


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def changes() -> Recorder:
    return Recorder()


@pytest.fixture
def breaker(clock: FakeTime, changes: Recorder) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_timeout_s=10.0, on_change=changes, clock=clock)


def trip(breaker: CircuitBreaker, times: int = 3) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record_failure()


def test_defaults_match_the_contract() -> None:
    breaker = CircuitBreaker()
    assert breaker.state == "closed"
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"
    assert 29.0 < breaker.retry_after() <= 30.0


def test_states_compare_equal_to_their_names() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]
    assert f"{HALF_OPEN}" == "half_open"


def test_closed_allows_and_has_no_wait(breaker: CircuitBreaker, changes: Recorder) -> None:
    for _ in range(10):
        assert breaker.allow()
    assert breaker.state is CLOSED
    assert breaker.retry_after() == 0.0
    assert changes.changes == []


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker, changes: Recorder) -> None:
    trip(breaker, 2)
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 2
    trip(breaker, 1)
    assert breaker.state is OPEN
    assert changes.changes == [(CLOSED, OPEN)]


def test_success_resets_the_failure_count(breaker: CircuitBreaker, changes: Recorder) -> None:
    trip(breaker, 2)
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    trip(breaker, 2)
    assert breaker.state is CLOSED
    assert changes.changes == []


def test_open_refuses_until_reset_timeout(breaker: CircuitBreaker, clock: FakeTime) -> None:
    trip(breaker)
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.advance(9.5)
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(0.5)
    assert breaker.state is OPEN


def test_half_open_after_timeout_allows_exactly_one_trial(
    breaker: CircuitBreaker, clock: FakeTime, changes: Recorder
) -> None:
    trip(breaker)
    clock.advance(10.0)
    assert breaker.retry_after() == 0.0
    assert breaker.allow()
    assert breaker.state is HALF_OPEN
    assert not breaker.allow()
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(10.0)
    assert changes.changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_successful_trial_closes(breaker: CircuitBreaker, clock: FakeTime, changes: Recorder) -> None:
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.allow() and breaker.allow()
    assert changes.changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # A fresh run of failures is needed to open again.
    trip(breaker, 2)
    assert breaker.state is CLOSED


def test_failed_trial_reopens_and_restarts_the_timer(
    breaker: CircuitBreaker, clock: FakeTime, changes: Recorder
) -> None:
    trip(breaker)
    clock.advance(25.0)
    assert breaker.allow()
    clock.advance(2.0)
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()
    assert breaker.state is HALF_OPEN
    assert changes.changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


def test_single_failure_in_half_open_reopens_regardless_of_threshold(breaker: CircuitBreaker, clock: FakeTime) -> None:
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is OPEN


def test_lost_trial_is_replaced_after_another_period(breaker: CircuitBreaker, clock: FakeTime) -> None:
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()  # the trial's caller never reports back (e.g. it was cancelled)
    clock.advance(9.0)
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.allow()
    assert not breaker.allow()
    assert breaker.state is HALF_OPEN


def test_late_failure_while_open_restarts_the_timer(
    breaker: CircuitBreaker, clock: FakeTime, changes: Recorder
) -> None:
    trip(breaker)
    clock.advance(6.0)
    breaker.record_failure()  # a request let through before the breaker opened
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(10.0)
    assert changes.changes == [(CLOSED, OPEN)]


def test_late_success_while_open_closes(breaker: CircuitBreaker, clock: FakeTime, changes: Recorder) -> None:
    trip(breaker)
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.allow()
    assert changes.changes == [(CLOSED, OPEN), (OPEN, CLOSED)]


def test_threshold_one_opens_on_first_failure(clock: FakeTime) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5.0, clock=clock)
    breaker.record_failure()
    assert breaker.state is OPEN
    assert not breaker.allow()


def test_zero_reset_timeout_goes_half_open_at_once(clock: FakeTime) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.0, clock=clock)
    breaker.record_failure()
    assert breaker.retry_after() == 0.0
    assert breaker.allow()
    assert breaker.state is HALF_OPEN


def test_on_change_sees_the_new_state_already_applied(clock: FakeTime) -> None:
    seen: list[tuple[str, str, str]] = []
    holder: list[CircuitBreaker] = []

    def on_change(old: BreakerState, new: BreakerState) -> None:
        seen.append((old, new, holder[0].state))

    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=1.0, on_change=on_change, clock=clock)
    holder.append(breaker)
    breaker.record_failure()
    assert seen == [("closed", "open", "open")]


def test_retry_after_never_negative(breaker: CircuitBreaker, clock: FakeTime) -> None:
    trip(breaker)
    clock.advance(1000.0)
    assert breaker.retry_after() == 0.0


@pytest.mark.parametrize("threshold, reset", [(0, 1.0), (-1, 1.0), (1, -0.1)])
def test_rejects_bad_parameters(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset)


def test_long_random_walk_keeps_invariants(clock: FakeTime) -> None:
    """Drive the breaker with a seeded random sequence and check it against a tiny reference model."""
    rng = random.Random(1234)
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=5.0, clock=clock)
    visited: set[BreakerState] = set()
    for _ in range(5000):
        action = rng.choice(["allow", "ok", "fail", "tick"])
        before, wait = breaker.state, breaker.retry_after()
        if action == "tick":
            clock.advance(rng.choice([0.5, 1.0, 2.5, 5.0]))
        elif action == "allow":
            allowed = breaker.allow()
            # allow() grants exactly when retry_after() said there was nothing to wait for.
            assert allowed == (wait == 0.0)
            if before is OPEN:
                assert breaker.state is (HALF_OPEN if allowed else OPEN)
            else:
                assert breaker.state is before
            if breaker.state is HALF_OPEN and allowed:
                assert not breaker.allow(), "a second trial was allowed while one is out"
        elif action == "ok":
            breaker.record_success()
            assert breaker.state is CLOSED and breaker.consecutive_failures == 0
        else:
            breaker.record_failure()
            if before is CLOSED:
                assert (breaker.state is OPEN) == (breaker.consecutive_failures >= 3)
            else:
                assert breaker.state is OPEN and breaker.retry_after() == 5.0
        assert 0.0 <= breaker.retry_after() <= 5.0
        visited.add(breaker.state)
    assert visited == {CLOSED, OPEN, HALF_OPEN}
