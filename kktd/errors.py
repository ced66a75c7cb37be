"""Errors that reach a client, each with a stable code, and the storage failures behind some of them."""

from __future__ import annotations

from typing import Any


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
    """A configuration value is wrong; the message names the key."""
