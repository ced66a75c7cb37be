"""The fiscal QR string and the one fiscalization time (kktd/fiscal.py), for every form an upstream uses."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kktd.delivery import FiscalData
from kktd.fiscal import fiscalized_at, qr_string, rfc3339_local
from kktd.receipt import sample_receipt
from kktd_mocks.ofd import MockOfd
from tests.conftest import AppFactory

MSK = timezone(timedelta(hours=3))


def fiscal(registered_at: str, fn_number: str | None = "9999078900004312") -> FiscalData:
    return FiscalData(17, "4402720961", registered_at, fn_number=fn_number)


@pytest.mark.parametrize(
    ("registered_at", "expected"),
    [
        ("2026-12-07T06:13:07.906Z", datetime(2026, 12, 7, 6, 13, 7, 906000, tzinfo=UTC)),  # kktd-ofd
        ("2026-12-07T09:13:07+03:00", datetime(2026, 12, 7, 6, 13, 7, tzinfo=UTC)),
        ("07.12.2026 09:16:18", datetime(2026, 12, 7, 6, 16, 18, tzinfo=UTC)),  # ATOL: the register's local time
    ],
)
def test_every_upstream_form_is_one_aware_time(registered_at: str, expected: datetime) -> None:
    moment = fiscalized_at(registered_at, MSK)
    assert moment == expected and moment is not None and moment.tzinfo is not None


@pytest.mark.parametrize("text", ["", "yesterday", "32.12.2026 09:16:18", "2026-13-01T00:00:00Z"])
def test_a_time_that_is_none_of_them_is_not_guessed(text: str) -> None:
    assert fiscalized_at(text, MSK) is None


def test_shown_in_the_terminal_zone_with_its_offset() -> None:
    moment = fiscalized_at("2026-12-07T06:13:07Z", MSK)
    assert moment is not None and rfc3339_local(moment, MSK) == "2026-12-07T09:13:07+03:00"


@pytest.mark.parametrize(("operation", "n"), [("sale", 1), ("sale_refund", 2), ("purchase", 3), ("purchase_refund", 4)])
def test_the_fns_check_string(operation: str, n: int) -> None:
    # The register's local minute, the total in rubles with kopecks, FN, document number, sign, operation type.
    assert qr_string(fiscal("2026-12-07T06:13:07.906Z"), operation, 24430, MSK) == (
        f"t=20261207T0913&s=244.30&fn=9999078900004312&i=17&fp=4402720961&n={n}"
    )


def test_without_an_fn_number_there_is_no_qr_code() -> None:
    assert qr_string(fiscal("2026-12-07T06:13:07Z", fn_number=None), "sale", 100, MSK) is None
    assert qr_string(fiscal("not a time"), "sale", 100, MSK) is None


@given(st.integers(min_value=0, max_value=10**12))
def test_the_sum_is_exact_to_the_kopeck(kopecks: int) -> None:
    qr = qr_string(fiscal("07.12.2026 09:16:18"), "sale", kopecks, MSK)
    assert qr is not None
    s = dict(part.split("=", 1) for part in qr.split("&"))["s"]
    rubles, _, cents = s.partition(".")
    assert len(cents) == 2 and int(rubles) * 100 + int(cents) == kopecks


async def test_a_receipt_sent_through_the_mock_ofd_shows_complete_fiscal_data(
    app_factory: AppFactory, mock_ofd: MockOfd
) -> None:
    """`make run` shows the whole shape of a sent receipt: no fiscal field null, the QR string ready to print."""
    app = await app_factory(ofd_url=mock_ofd.url)
    created = await (await app.client.post("/v1/kkt/receipt", json=sample_receipt("qr-1"))).json()
    assert (await app.kktd.sync.run_once_now()).delivered == 1
    for path in (f"/v1/kkt/receipt/{created['receipt_id']}", "/v1/kkt/receipt?idempotency_key=qr-1"):
        shown = (await (await app.client.get(path)).json())["ofd"]
        assert all(shown[key] is not None for key in ("fn_number", "shift_number", "receipt_number", "qr"))
        at = datetime.fromisoformat(shown["fiscalized_at"])
        assert at.tzinfo is not None and at.utcoffset() == datetime.now().astimezone().utcoffset()
        assert shown["qr"] == qr_string(
            FiscalData(
                shown["fiscal_document_number"], shown["fiscal_sign"], shown["fiscalized_at"], shown["fn_number"]
            ),
            "sale",
            created["total"],
        )
        assert shown["qr"].startswith(f"t={at:%Y%m%dT%H%M}&s=") and shown["qr"].endswith("&n=1")
    exported = await (await app.client.get("/v1/kkt/receipts?since=2020-01-01T00:00:00Z")).text()
    assert json.loads(exported.splitlines()[0])["ofd"]["qr"] == shown["qr"]
