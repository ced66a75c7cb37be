"""The receipt store: the single SQLite writer (writer.py), the schema with its migrations and checks
(schema.py), and the typed receipt queries (queries.py, rows.py)."""

from kktd.store.rows import Accepted, Conflict, Counts, ReceiptRow, ReceiptStatus, Registration
from kktd.store.schema import PRAGMAS, SCHEMA_VERSION, check_database
from kktd.store.writer import Store

__all__ = [
    "PRAGMAS",
    "SCHEMA_VERSION",
    "Accepted",
    "Conflict",
    "Counts",
    "ReceiptRow",
    "ReceiptStatus",
    "Registration",
    "Store",
    "check_database",
]
