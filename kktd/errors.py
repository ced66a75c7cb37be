"""Errors that reach a client, each with a stable code, and the storage failures behind some of them."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ErrorCode(enum.StrEnum):
    """kktd's own stable error codes, the one list of them, each with the HTTP statuses kktd answers it with
    and its meaning for clients: docs/api.md's table of errors is generated from them (`python -m
    kktd.error_table --write docs/api.md`; tests/test_docs.py checks the statuses against every place that
    raises the code). The metrics create a rejection series for each at start. An upstream's intake check may
    refuse with codes of its own (UpstreamSpec.intake_codes; their meanings are INTAKE_CODE_MEANINGS)."""

    _value_: str
    statuses: tuple[int, ...]
    meaning: str

    def __new__(cls, value: str, statuses: int | tuple[int, ...], meaning: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.statuses = statuses if isinstance(statuses, tuple) else (statuses,)
        member.meaning = meaning
        return member

    # 400: the body is not a JSON document, or a query parameter is wrong
    INVALID_JSON = (
        "invalid_json",
        400,
        "the body is not JSON (RFC 8259; `NaN` and `Infinity` included), or a resolution that is not an object",
    )
    INVALID_ENCODING = "invalid_encoding", 400, "not UTF-8, a byte order mark, or NUL bytes (UTF-16/32)"
    DUPLICATE_KEY = "duplicate_key", 400, "a key appears twice in one object"
    NESTING_TOO_DEEP = "nesting_too_deep", 400, "arrays or objects nested too deeply"
    NUMBER_TOO_LARGE = "number_too_large", 400, "an integer with too many digits"
    INVALID_QUERY = (
        "invalid_query",
        400,
        "a query parameter missing, out of range or not of its form (`limit`, `after_seq`, `since`, `until`, "
        "`idempotency_key`)",
    )
    # the request as HTTP
    UNAUTHORIZED = "unauthorized", 401, "a token is configured and the request did not present it"
    NOT_FOUND = "not_found", 404, "no such receipt, or no such route"
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "the route exists with another method (`Allow` says which)"
    BODY_TIMEOUT = (
        "body_timeout",
        408,
        "the body did not arrive within `body_timeout`; the connection is closed",
    )
    IDEMPOTENCY_CONFLICT = "idempotency_conflict", 409, "the key is already used by a receipt with a different body"
    NOT_DEAD_LETTER = "not_dead_letter", 409, "requeue or resolve of a receipt that is not a dead letter"
    BODY_TOO_LARGE = "body_too_large", 413, "a body over 64 KiB"
    UNSUPPORTED_MEDIA_TYPE = (
        "unsupported_media_type",
        415,
        "`Content-Type` is not `application/json`, or the body is compressed (`Content-Encoding`)",
    )
    # 422: the receipt (or a dead letter's resolution) breaks a rule
    MISSING_FIELD = "missing_field", 422, "a required field is absent (the idempotency key: body or header)"
    UNKNOWN_FIELD = "unknown_field", 422, "a field the receipt format does not have"
    INVALID_TYPE = (
        "invalid_type",
        422,
        "a value of the wrong JSON type (money is an integer of kopecks), or a receipt that is not an object",
    )
    INVALID_VALUE = (
        "invalid_value",
        422,
        "not one of the allowed values, or text holding control, bidirectional-override or invisible formatting "
        "characters",
    )
    INVALID_LENGTH = "invalid_length", 422, "a text's length out of bounds"
    INVALID_COUNT = "invalid_count", 422, "a list's number of entries out of bounds"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key", 422, "not 1..64 characters of `A-Z a-z 0-9 . _ : -`"
    IDEMPOTENCY_KEY_MISMATCH = (
        "idempotency_key_mismatch",
        422,
        "the `Idempotency-Key` header and the body's `idempotency_key` differ",
    )
    INVALID_QUANTITY = (
        "invalid_quantity",
        422,
        "a quantity that is not a positive decimal with at most 3 decimals",
    )
    AMOUNT_OUT_OF_RANGE = (
        "amount_out_of_range",
        422,
        "an amount or total beyond the limit (an upstream's intake check may set a lower one)",
    )
    PAYMENT_TOTAL_MISMATCH = "payment_total_mismatch", 422, "payments do not add up to the total"
    INVALID_INN = "invalid_inn", 422, "`cashier.inn` is not 12 digits"
    INVALID_CONTACT = (
        "invalid_contact",
        422,
        "`customer_contact` is neither an e-mail address nor a phone number like `+79991234567`",
    )
    ITEM_SUM_MISMATCH = (
        "item_sum_mismatch",
        422,
        "an item's `sum` is not `price` × `quantity` rounded half up to the kopeck",
    )
    # kktd's own state
    INTERNAL_ERROR = "internal_error", 500, "a bug; the log has the traceback"
    BUFFER_FULL = "buffer_full", 503, "`max_pending` undelivered receipts; nothing stored, `Retry-After`"
    STORAGE_UNAVAILABLE = (
        "storage_unavailable",
        503,
        "the database refuses commits (disk full, I/O error, read-only) or is damaged; `Retry-After`",
    )
    SHUTTING_DOWN = "shutting_down", 503, "kktd is stopping; `Retry-After`"
    SYNC_UNAVAILABLE = "sync_unavailable", 503, "`POST /v1/kkt/buffer/sync` while the sync loop is not running"
    # a register kktd drives itself: its shift (GET /v1/kkt/shift, POST /v1/kkt/shift/open, .../close)
    NO_REGISTER = "no_register", 409, "a shift command while the upstream is not a register kktd drives itself"
    SHIFT_STATE = (
        "shift_state",
        409,
        "the register's shift is not in the state the command needs (opening an open one, closing a closed one)",
    )
    REGISTER_UNAVAILABLE = (
        "register_unavailable",
        503,
        "the register did not carry out the shift command (the message says why)",
    )


# What an upstream's own intake codes (UpstreamSpec.intake_codes) mean, by code: the table of errors says
# which upstream refuses with each. Every declared code needs its line here (tests/test_docs.py).
INTAKE_CODE_MEANINGS: dict[str, str] = {
    "customer_contact_required": "the buyer's contact (`customer_contact`) is required",
    "quantity_out_of_range": "a quantity above 99999.999",
}


class ApiError(Exception):
    """A failure answered to the HTTP client: the code is stable and machine-readable, the message is for people."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class StorageError(Exception):
    """The buffer could not do what was asked; nothing was acknowledged."""


class BufferFull(StorageError):
    def __init__(self, capacity: int) -> None:
        super().__init__(f"buffer holds {capacity} undelivered receipts, its capacity")
        self.capacity = capacity


class StorageUnavailable(StorageError):
    """The database or the disk under it failed (I/O error, disk full, database closed or wedged)."""


class CorruptDatabase(StorageError):
    """The database failed its integrity check; it is never replaced silently."""


class ForeignWal(CorruptDatabase):
    """The -wal beside the database is not its own (another database's, or from before a restore): applying
    it would replace acknowledged receipts. Neither file is touched."""


class ConfigError(Exception):
    """One or more configuration values are wrong; each problem names its key.

    Every check runs before one ConfigError carries all the problems found: configuring an upstream
    takes one run of `kktd check-config`, not one per missing key.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems: tuple[str, ...] = problems

    def __str__(self) -> str:
        return "; ".join(self.problems)

    @classmethod
    def collect(cls, problems: list[str], check: Callable[[], T]) -> T | None:
        """Run `check`; on ConfigError add its problems to `problems` and return None."""
        try:
            return check()
        except cls as exc:
            problems.extend(exc.problems)
            return None
