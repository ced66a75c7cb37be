"""What a POS prints from a fiscalized receipt: the time of fiscalization with its zone and the QR code string.

The QR code is the FNS receipt-check string (`t=YYYYMMDDTHHMM&s=RUBLES.KK&fn=…&i=…&fp=…&n=…`): the register's
local time of the document (tag 1012) to the minute, the total in rubles, the FN number (1041), the fiscal
document number (1040), its fiscal sign (1077) and the operation type (1054: 1 sale, 2 sale refund, 3 purchase,
4 purchase refund). kktd builds it from the stored fiscal data, for every upstream alike.
"""

from __future__ import annotations

from datetime import datetime, tzinfo

from kktd.delivery import FiscalData

# Tag 1054, by kktd's operation names (kktd/receipt.py).
OPERATION_TYPES = {"sale": 1, "sale_refund": 2, "purchase": 3, "purchase_refund": 4}
# How a register writes its local time (a cloud register's report, a local register's answers): dd.mm.yyyy.
REGISTER_TIME_FORMAT = "%d.%m.%Y %H:%M:%S"


def fiscalized_at(registered_at: str, zone: tzinfo | None = None) -> datetime | None:
    """The upstream's time of fiscalization as an aware datetime: RFC 3339 as given, or a register's local
    `dd.mm.yyyy HH:MM:SS` read in `zone` (None: the terminal's own zone, which the register shares).
    None for a text that is neither (it is shown as stored, never guessed at)."""
    try:
        moment = datetime.fromisoformat(registered_at)
    except ValueError:
        try:
            moment = datetime.strptime(registered_at, REGISTER_TIME_FORMAT)
        except ValueError:
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone) if zone is not None else moment.astimezone()
    return moment


def rfc3339_local(moment: datetime, zone: tzinfo | None = None) -> str:
    """In the terminal's zone with its offset (2026-12-07T09:16:18+03:00): the shop's clock, unambiguous."""
    local = moment.astimezone(zone) if zone is not None else moment.astimezone()
    return local.isoformat(timespec="milliseconds" if local.microsecond else "seconds")


def qr_string(fiscal: FiscalData, operation: str, total_kopecks: int, zone: tzinfo | None = None) -> str | None:
    """The FNS check string, or None when the upstream did not give what it needs (the FN number)."""
    moment = fiscalized_at(fiscal.registered_at, zone)
    kind = OPERATION_TYPES.get(operation)
    if fiscal.fn_number is None or moment is None or kind is None:
        return None
    local = moment.astimezone(zone) if zone is not None else moment.astimezone()
    rubles, kopecks = divmod(total_kopecks, 100)
    return (
        f"t={local:%Y%m%dT%H%M}&s={rubles}.{kopecks:02d}&fn={fiscal.fn_number}"
        f"&i={fiscal.fiscal_document_number}&fp={fiscal.fiscal_sign}&n={kind}"
    )
