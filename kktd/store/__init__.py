"""The receipt store: the single SQLite writer (writer.py), the schema with its migrations and checks
(schema.py), and the typed receipt queries (queries.py, rows.py)."""

from kktd.store.rows import (Accepted, Conflict, Counts, FiscalRecord, PendingReceipt, ReceiptRow, ReceiptStatus,
                             Registration, SubmittedReceipt)
from kktd.store.schema import PRAGMAS, SCHEMA_VERSION, check_database
from kktd.store.writer import Store

__all__ = ["Accepted", "Conflict", "Counts", "FiscalRecord", "PRAGMAS", "PendingReceipt", "ReceiptRow",
           "ReceiptStatus", "Registration", "SCHEMA_VERSION", "Store", "SubmittedReceipt", "check_database"]
