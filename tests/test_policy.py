"""DeliveryPolicy, driven by a fake clock the way the breaker is (tests/test_breaker.py): no loop, no store,
no sleeping. Every rule of kktd/sync/policy.py: the batch limit, held-back and suspect receipts, lone
failures and when they count against a receipt."""

from __future__ import annotations

import pytest

from kktd.sync.policy import MAX_HELD, POLL_INTERVAL_S, DeliveryPolicy, PollSchedule
from tests.support import FakeTime

HOLD_S = 120.0


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def policy(clock: FakeTime) -> DeliveryPolicy:
    return DeliveryPolicy(batch_size=50, hold_s=HOLD_S, clock=clock)


def fail_alone(policy: DeliveryPolicy, receipt_id: str) -> bool:
    return policy.on_failure([receipt_id]).strike


# ---- the batch limit ----


def test_starts_at_full_speed(policy: DeliveryPolicy) -> None:
    assert (policy.batch_limit, policy.generation) == (50, 0)
    assert policy.at_full_speed()
    assert policy.exclusions() == () and policy.probe_exclusions() is None


def test_every_failure_halves_the_limit_down_to_one(policy: DeliveryPolicy) -> None:
    limits = []
    for _ in range(8):
        policy.on_failure(["a", "b"])
        limits.append(policy.batch_limit)
    assert limits == [25, 12, 6, 3, 1, 1, 1, 1]
    assert policy.generation == 8
    assert not policy.at_full_speed()


def test_only_a_batch_of_the_current_generation_grows_the_limit(policy: DeliveryPolicy) -> None:
    sent_before = policy.generation
    policy.on_failure(["a", "b"])
    policy.on_failure(["c", "d"])
    assert policy.batch_limit == 12
    # A sibling that was already on the wire when the failures happened says nothing about them.
    policy.on_success(sent_before)
    assert policy.batch_limit == 12
    policy.on_success(policy.generation)
    assert policy.batch_limit == 24
    policy.on_success(policy.generation)
    assert policy.batch_limit == 48
    policy.on_success(policy.generation)
    assert policy.batch_limit == 50  # never beyond the configured batch size
    assert policy.at_full_speed()


def test_a_failed_batch_of_several_holds_and_strikes_nothing(policy: DeliveryPolicy) -> None:
    verdict = policy.on_failure(["a", "b", "c"])
    assert verdict.strike is False
    assert policy.held == {} and policy.exclusions() == ()


# ---- lone failures: hold, and strike only after an acknowledgement since the previous one ----


def test_a_first_lone_failure_holds_the_receipt_without_a_strike(policy: DeliveryPolicy, clock: FakeTime) -> None:
    policy.on_answered(["other"])  # the upstream works ...
    assert fail_alone(policy, "p") is False  # ... but one lone failure proves nothing yet
    assert policy.held == {"p": clock() + HOLD_S}
    assert policy.exclusions() == ("p",)


def test_lone_failures_without_an_acknowledgement_between_them_never_strike(
    policy: DeliveryPolicy, clock: FakeTime
) -> None:
    """An upstream that fails everyone: each receipt fails alone again and again, none is to blame."""
    for _ in range(20):
        assert fail_alone(policy, "p") is False
        clock.advance(1.0)
    assert fail_alone(policy, "q") is False
    assert policy.probe_exclusions() == ()  # nobody is a suspect


def test_a_lone_failure_after_others_were_acknowledged_strikes(policy: DeliveryPolicy, clock: FakeTime) -> None:
    assert fail_alone(policy, "p") is False
    clock.advance(1.0)
    policy.on_answered(["a", "b"])  # others got through since p's lone failure: the upstream works
    clock.advance(1.0)
    assert fail_alone(policy, "p") is True
    assert policy.held["p"] == clock() + HOLD_S
    # p is a suspect now: it is no longer a probe when only held receipts are left.
    assert policy.probe_exclusions() is None
    assert policy.only_held_pending(1)


def test_an_acknowledgement_before_the_previous_lone_failure_does_not_count(
    policy: DeliveryPolicy, clock: FakeTime
) -> None:
    policy.on_answered(["a"])
    clock.advance(1.0)
    assert fail_alone(policy, "p") is False
    clock.advance(1.0)
    assert fail_alone(policy, "p") is False  # the only ack is older than p's previous lone failure


def test_an_answer_for_the_receipt_itself_clears_its_record(policy: DeliveryPolicy, clock: FakeTime) -> None:
    assert fail_alone(policy, "p") is False
    clock.advance(1.0)
    policy.on_answered(["p", "a"])  # p itself got through: its earlier failure was not its own
    clock.advance(1.0)
    assert fail_alone(policy, "p") is False


def test_a_strike_is_cleared_when_the_next_lone_failure_proves_nothing(policy: DeliveryPolicy, clock: FakeTime) -> None:
    fail_alone(policy, "p")
    clock.advance(1.0)
    policy.on_answered(["a"])
    clock.advance(1.0)
    assert fail_alone(policy, "p") is True
    clock.advance(1.0)
    assert fail_alone(policy, "p") is False  # no ack since the struck failure
    assert policy.probe_exclusions() == ()  # no longer a suspect


# ---- suspects, probes and the release of holds ----


def test_an_answer_releases_the_holds_nothing_showed_to_be_their_own(policy: DeliveryPolicy, clock: FakeTime) -> None:
    fail_alone(policy, "suspect")
    clock.advance(1.0)
    policy.on_answered(["x"])
    clock.advance(1.0)
    assert fail_alone(policy, "suspect") is True
    assert fail_alone(policy, "innocent") is False  # held while the upstream failed for everyone
    assert set(policy.held) == {"suspect", "innocent"}
    policy.on_answered(["y"])
    assert set(policy.held) == {"suspect"}  # the innocent one goes back in line at once
    assert policy.exclusions() == ("suspect",)


def test_probe_exclusions_leave_out_only_the_suspects(policy: DeliveryPolicy, clock: FakeTime) -> None:
    fail_alone(policy, "s")
    clock.advance(1.0)
    policy.on_answered(["x"])
    clock.advance(1.0)
    fail_alone(policy, "s")
    fail_alone(policy, "u1")
    fail_alone(policy, "u2")
    # Only held receipts left: the ones nothing points at are the best probe there is.
    assert policy.probe_exclusions() == ("s",)
    assert not policy.only_held_pending(3)
    assert policy.only_held_pending(1)
    assert not policy.only_held_pending(0)


def test_with_only_suspects_held_there_is_no_probe(policy: DeliveryPolicy, clock: FakeTime) -> None:
    for receipt_id in ("s1", "s2"):
        fail_alone(policy, receipt_id)
    clock.advance(1.0)
    policy.on_answered(["x"])
    clock.advance(1.0)
    assert fail_alone(policy, "s1") is True and fail_alone(policy, "s2") is True
    assert policy.probe_exclusions() is None
    assert policy.only_held_pending(2) and not policy.only_held_pending(3)


def test_holds_expire_and_take_the_suspicion_with_them(policy: DeliveryPolicy, clock: FakeTime) -> None:
    fail_alone(policy, "p")
    clock.advance(1.0)
    policy.on_answered(["x"])
    clock.advance(1.0)
    assert fail_alone(policy, "p") is True
    clock.advance(HOLD_S - 0.001)
    assert policy.exclusions() == ("p",)
    clock.advance(0.001)
    assert policy.exclusions() == ()
    assert policy.held == {}
    assert not policy.only_held_pending(1)
    assert policy.probe_exclusions() is None  # nothing held, nothing to probe around


def test_forget_drops_every_trace_of_a_dead_letter(policy: DeliveryPolicy, clock: FakeTime) -> None:
    fail_alone(policy, "p")
    clock.advance(1.0)
    policy.on_answered(["x"])
    clock.advance(1.0)
    assert fail_alone(policy, "p") is True
    policy.forget(["p"])
    assert policy.held == {} and not policy.only_held_pending(1)
    clock.advance(1.0)
    assert fail_alone(policy, "p") is False  # a requeued receipt starts with a clean record


def test_the_number_of_held_receipts_is_capped(policy: DeliveryPolicy, clock: FakeTime) -> None:
    for i in range(MAX_HELD + 50):
        fail_alone(policy, f"r{i}")
        clock.advance(0.001)
    assert len(policy.held) == MAX_HELD
    # The holds that end soonest make room.
    assert "r0" not in policy.held and "r49" not in policy.held
    assert "r50" in policy.held and f"r{MAX_HELD + 49}" in policy.held


def test_the_cap_evicts_a_suspect_with_its_suspicion(policy: DeliveryPolicy, clock: FakeTime) -> None:
    fail_alone(policy, "s")
    clock.advance(1.0)
    policy.on_answered(["x"])
    clock.advance(1.0)
    assert fail_alone(policy, "s") is True
    for i in range(MAX_HELD):
        fail_alone(policy, f"r{i}")
    assert "s" not in policy.held
    assert policy.probe_exclusions() == ()


# ---- how long the loop may idle ----


def test_idle_timeout_is_the_interval_or_the_end_of_the_soonest_hold(policy: DeliveryPolicy, clock: FakeTime) -> None:
    assert policy.idle_timeout(5.0) == 5.0
    fail_alone(policy, "p")
    assert policy.idle_timeout(5.0) == 5.0  # the hold ends long after the interval
    clock.advance(HOLD_S - 2.0)
    assert policy.idle_timeout(5.0) == pytest.approx(2.0)
    fail_alone(policy, "q")
    assert policy.idle_timeout(5.0) == pytest.approx(2.0)  # the soonest hold counts
    clock.advance(2.0 - 0.001)
    assert policy.idle_timeout(5.0) == 0.01  # never a busy zero


def test_the_poll_schedule_never_polls_a_document_twice_within_the_interval_across_a_restart(clock: FakeTime) -> None:
    """A document registered by an earlier process (unknown to this schedule) is first due one interval
    after the schedule was made: a kill right after a poll and an instant restart cannot poll it early."""
    schedule = PollSchedule(clock)
    assert not schedule.is_due("registered-before-the-restart")
    assert schedule.seconds_until_next() == POLL_INTERVAL_S
    clock.advance(POLL_INTERVAL_S)
    assert schedule.is_due("registered-before-the-restart")
    schedule.polled(["registered-before-the-restart"])
    assert not schedule.is_due("registered-before-the-restart")
    assert schedule.seconds_until_next() == POLL_INTERVAL_S
    clock.advance(POLL_INTERVAL_S)
    assert schedule.is_due("registered-before-the-restart") and schedule.seconds_until_next() == 0.0
    schedule.forget(["registered-before-the-restart"])
    assert schedule.seconds_until_next() == 0.0
