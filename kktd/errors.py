"""Errors that reach a client, each with a stable code, and the storage failures behind some of them."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ErrorCode(enum.StrEnum):
    """kktd's own stable error codes, the one list of them (docs/api.md tabulates them for clients): the
    metrics create a rejection series for each at start. An upstream's intake check may refuse with codes of
    its own (its module names them)."""

    # 400: the body is not a JSON document, or a query parameter is wrong
    INVALID_JSON = "invalid_json"
    INVALID_ENCODING = "invalid_encoding"
    DUPLICATE_KEY = "duplicate_key"
    NESTING_TOO_DEEP = "nesting_too_deep"
    NUMBER_TOO_LARGE = "number_too_large"
    INVALID_QUERY = "invalid_query"
    # the request as HTTP
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TIMEOUT = "body_timeout"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    NOT_DEAD_LETTER = "not_dead_letter"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # 422: the receipt breaks a rule
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    INVALID_TYPE = "invalid_type"
    INVALID_VALUE = "invalid_value"
    INVALID_LENGTH = "invalid_length"
    INVALID_COUNT = "invalid_count"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    IDEMPOTENCY_KEY_MISMATCH = "idempotency_key_mismatch"
    INVALID_QUANTITY = "invalid_quantity"
    AMOUNT_OUT_OF_RANGE = "amount_out_of_range"
    PAYMENT_TOTAL_MISMATCH = "payment_total_mismatch"
    INVALID_INN = "invalid_inn"
    INVALID_CONTACT = "invalid_contact"
    ITEM_SUM_MISMATCH = "item_sum_mismatch"
    # kktd's own state
    INTERNAL_ERROR = "internal_error"
    BUFFER_FULL = "buffer_full"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    SHUTTING_DOWN = "shutting_down"
    SYNC_UNAVAILABLE = "sync_unavailable"


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
