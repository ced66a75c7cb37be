"""The documents a newcomer reads agree with the code: every error code tabulated once, no stale pointers."""

from __future__ import annotations

import re

from kktd.errors import ErrorCode
from kktd.upstreams import REGISTRY
from tests.support import REPO

API = REPO / "docs" / "api.md"


def error_table() -> list[tuple[int, str]]:
    """(status, code) per code of docs/api.md's table of errors (a row may name two codes)."""
    text = API.read_text()
    start = text.index("| status | code | meaning |")
    rows = text[start : text.index("\n\n", start)].splitlines()[2:]
    table: list[tuple[int, str]] = []
    for row in rows:
        _, status, codes, *_ = row.split("|")
        table += [(int(status), code) for code in re.findall(r"`([a-z0-9_]+)`", codes)]
    return table


def test_every_error_code_is_in_the_table_once() -> None:
    """kktd's own codes and every registered upstream's intake codes: a client can look each one up."""
    codes = [code for _, code in error_table()]
    expected = {code.value for code in ErrorCode} | {c for spec in REGISTRY.values() for c in spec.intake_codes}
    assert sorted(codes) == sorted(expected)


def test_statuses_are_those_of_their_class() -> None:
    for status, code in error_table():
        assert 400 <= status < 600, (status, code)
        if code.startswith("invalid_") and code not in ("invalid_json", "invalid_encoding", "invalid_query"):
            assert status == 422, (status, code)


def test_the_readme_names_no_internal_issue_numbers() -> None:
    text = (REPO / "README.md").read_text()
    assert not re.search(r"\b[Ii]ssue\s*#?\d+|\(#\d+\)", text)


def test_the_docs_point_only_at_files_that_exist() -> None:
    """Paths in backquotes that look like the repository's own files (kktd/…, tests/…, docs/…) exist."""
    # What the build or the benchmark writes (gitignored) is named in the docs but absent from a fresh clone.
    generated = [line.strip("/") for line in (REPO / ".gitignore").read_text().split() if line.startswith("/")]
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for path in re.findall(r"`((?:kktd|kktd_mocks|tests|docs|systemd|packaging|bench)/[\w./-]+)`", doc.read_text()):
            if any(path.startswith(prefix) for prefix in generated):
                continue
            if not (REPO / path.rstrip(".")).exists() and "*" not in path:
                missing.append(f"{doc.name}: {path}")
        assert "../shared" not in doc.read_text(), f"{doc.name} points outside the repository"
    assert not missing, missing
