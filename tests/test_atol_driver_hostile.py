"""Whatever the driver's web server answers, the register adapter answers with an outcome or an
UpstreamUnavailable / RegisterUnavailable: never another exception (which would stop the sync loop or answer a
500), never a receipt fiscalized from an answer that is not a ready result of its own task."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kktd.delivery import (
    AwaitingResult,
    Fiscalized,
    NotRegistered,
    Outgoing,
    Refused,
    Registered,
    RegisterUnavailable,
    StillProcessing,
    Undelivered,
    UpstreamUnavailable,
)
from kktd.receipt import sample_receipt, validate_receipt
from kktd.upstreams.atol_driver import AtolDriver, DriverSettings
from kktd.upstreams.http import RawAnswer
from tests.fuzzing import fuzz_settings

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["ready", "error", "wait", "blocked", "opened", "expired", "0001-01-01T00:00:00", "9" * 30]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
keys = st.sampled_from(
    [
        "status",
        "error",
        "code",
        "description",
        "errorCode",
        "result",
        "fiscalParams",
        "fiscalDocumentNumber",
        "fiscalDocumentSign",
        "fiscalDocumentDateTime",
        "fnNumber",
        "total",
        "fnStatus",
        "shiftStatus",
        "state",
        "number",
        "expiredTime",
        "deviceStatus",
        "paperPresent",
        "notSentCount",
        "notSentFirstDocDateTime",
        "fnInfo",
        "validityDate",
        "warnings",
        "notPrinted",
    ]
)
# Shaped like the web server's answers (a results list of entries with the fields kktd reads), with any values.
entries = st.dictionaries(keys, json_values | st.dictionaries(keys, json_values | st.dictionaries(keys, json_values)))
documents = st.one_of(json_values, st.fixed_dictionaries({"results": st.lists(entries | json_values, max_size=5)}))

RECEIPT = validate_receipt(sample_receipt("hostile-1"))
OUTGOING = Outgoing("0" * 32, "hostile-1", "hostile-1", 1_796_000_000_000, RECEIPT.canonical_json)
AWAITING = AwaitingResult("0" * 32, "hostile-1", "6f1d4c1e-5b8a-4f43-9a51-000000000000;total=24430")
ALLOWED = (Fiscalized, NotRegistered, Refused, Registered, StillProcessing, Undelivered)


def adapter_answering(document: Any) -> AtolDriver:
    """An adapter whose every HTTP exchange is answered 200 (201 for a POST) with `document`."""
    adapter = AtolDriver(DriverSettings(url="http://127.0.0.1:9", timeout=0.05), clock=_ticking())
    body = json.dumps(document, allow_nan=True).encode()

    async def exchange(method: str, url: Any, data: bytes | None, headers: Any, **_: Any) -> RawAnswer:
        return RawAnswer(201 if method == "POST" else 200, "application/json", body)

    adapter._exchange = exchange  # type: ignore[method-assign,assignment]
    return adapter


def _ticking() -> Callable[[], float]:
    """A clock that moves a second per reading: a control task that never finishes times out at once."""
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    return clock


def calling(adapter: AtolDriver, call: str) -> Callable[[], Any]:
    """The adapter's entry points the sync loop, the housekeeping and the shift routes use."""
    return {
        "poll": lambda: adapter.poll([AWAITING]),
        "submit": lambda: adapter.submit([OUTGOING]),
        "shift": adapter.shift,
        "report": adapter.report,
    }[call]


async def outcome_or_unavailable(call: Callable[[], Any]) -> Any:
    try:
        return await call()
    except (UpstreamUnavailable, RegisterUnavailable) as exc:
        return exc


@fuzz_settings(400)
@given(document=documents)
def test_any_answer_is_an_outcome_or_unavailable(document: Any) -> None:
    async def run() -> None:
        for call in ("poll", "submit", "shift", "report"):
            got = await outcome_or_unavailable(calling(adapter_answering(document), call))
            if isinstance(got, list):
                assert len(got) == 1 and isinstance(got[0], ALLOWED), got
                if isinstance(got[0], Fiscalized):
                    # Only a ready result with well-formed fiscal data of this receipt's total.
                    results = document["results"]
                    assert isinstance(results, list) and results[-1].get("status") == "ready", document

    asyncio.run(run())
