"""The documents a newcomer reads agree with the code: the table of errors is the one generated from the code
(every code once per status it is answered with), no stale pointers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from kktd import error_table as error_table_module
from kktd.errors import INTAKE_CODE_MEANINGS, ErrorCode
from kktd.upstreams import REGISTRY
from tests.support import REPO

API = REPO / "docs" / "api.md"


def error_table() -> list[tuple[int, str]]:
    """(status, code) per row of docs/api.md's table of errors (a row may name two codes)."""
    text = API.read_text()
    start = text.index("| status | code | meaning |")
    rows = text[start : text.index("\n\n", start)].splitlines()[2:]
    table: list[tuple[int, str]] = []
    for row in rows:
        _, status, codes, *_ = row.split("|")
        table += [(int(status), code) for code in re.findall(r"`([a-z0-9_]+)`", codes)]
    return table


def test_the_error_table_is_the_generated_one() -> None:
    """docs/api.md's table of errors is kktd.error_table's, generated from kktd/errors.py and the registry."""
    text = API.read_text()
    assert text.count(error_table_module.BEGIN) == 1 and text.count(error_table_module.END) == 1
    assert error_table_module.replace_table(text) == text, (
        f"docs/api.md's table of errors is not the generated one: run `.venv/bin/{error_table_module.REGENERATE}`"
    )


def test_every_error_code_is_in_the_table_once() -> None:
    """kktd's own codes and every registered upstream's intake codes: a client can look each one up, under
    each status it can come with."""
    table = error_table()
    assert len(table) == len(set(table)), "a (status, code) twice in the table"
    expected = {(status, code.value) for code in ErrorCode for status in code.statuses}
    expected |= {(422, code) for spec in REGISTRY.values() for code in spec.intake_codes}
    assert sorted(table) == sorted(expected)


def test_statuses_are_those_of_their_class() -> None:
    for status, code in error_table():
        assert 400 <= status < 600, (status, code)
        if code.startswith("invalid_") and code not in ("invalid_json", "invalid_encoding", "invalid_query"):
            assert status == 422, (status, code)


def test_every_code_has_a_meaning() -> None:
    """Each code has its line, every intake code declared by an upstream too, and no meaning is left over
    for a code no upstream declares any more."""
    for code in ErrorCode:
        assert code.statuses and code.meaning.strip(), code
    declared = {code for spec in REGISTRY.values() for code in spec.intake_codes}
    assert set(INTAKE_CODE_MEANINGS) == declared
    assert not declared & {code.value for code in ErrorCode}, "an intake code is one of kktd's own"


# How a code reaches a client, by the callable it is passed to, and the status that callable answers with:
# ApiError names it (its first argument); a MalformedBody is a 400, any other ReceiptInvalid (an intake check's
# too) a 422 (kktd.api.api_error); _retry_later is kktd.api's 503 with Retry-After.
FIXED_STATUS = {"MalformedBody": 400, "ReceiptInvalid": 422, "_retry_later": 503}
# parse_receipt's fast path refuses with this code, catches it and runs the reference validator: never answered.
INTERNAL_CODES = {"refused"}


def raised_codes() -> dict[str, set[int]]:
    """code -> the statuses kktd answers it with, read from every place in kktd/ that raises or maps a code:
    ApiError(status, code, ...), MalformedBody(code, ...), ReceiptInvalid(code, ...), _retry_later(code, ...)
    and a dict literal {status: ErrorCode.X} (aiohttp's own 404 and 405)."""
    codes = {code.value for code in ErrorCode} | {c for spec in REGISTRY.values() for c in spec.intake_codes}

    def code_of(node: ast.expr) -> str | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ErrorCode":
            return ErrorCode[node.attr].value
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value in codes | INTERNAL_CODES, f"code {node.value!r} is in no table"
            return node.value if node.value in codes else None
        return None  # a variable (its values are raised somewhere as literals too) or an f-string (http_NNN)

    found: dict[str, set[int]] = {}
    for path in sorted((REPO / "kktd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            pairs: list[tuple[int, str | None]] = []
            if isinstance(node, ast.Call) and node.args:
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                first = node.args[0]
                if name == "ApiError" and len(node.args) > 1 and isinstance(first, ast.Constant):
                    assert isinstance(first.value, int), ast.dump(first)
                    pairs.append((first.value, code_of(node.args[1])))
                elif name in FIXED_STATUS:
                    pairs.append((FIXED_STATUS[name], code_of(node.args[0])))
            elif isinstance(node, ast.Dict):
                pairs += [
                    (key.value, code_of(value))
                    for key, value in zip(node.keys, node.values, strict=True)
                    if isinstance(key, ast.Constant) and isinstance(key.value, int)
                ]
            for status, code in pairs:
                if code is not None:
                    found.setdefault(code, set()).add(status)
    return found


def test_the_statuses_recorded_are_the_ones_kktd_answers_with() -> None:
    """ErrorCode's statuses (the table's) are every status the code is raised with, and only those."""
    found = raised_codes()
    recorded = {code.value: set(code.statuses) for code in ErrorCode}
    recorded |= {code: {422} for spec in REGISTRY.values() for code in spec.intake_codes}
    assert found == recorded


def test_the_generator_prints_and_writes_the_table(tmp_path: Path) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "kktd.error_table"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert printed.stdout == error_table_module.markdown()
    assert printed.stdout.splitlines()[0] == "| status | code | meaning |"
    stale = tmp_path / "api.md"
    stale.write_text(f"# x\n\n{error_table_module.BEGIN}\n| old |\n{error_table_module.END}\n\nafter\n")
    command = [sys.executable, "-m", "kktd.error_table"]
    checked = subprocess.run([*command, "--check", str(stale)], capture_output=True, text=True, cwd=REPO)
    assert checked.returncode == 1 and error_table_module.REGENERATE in checked.stderr
    subprocess.run([*command, "--write", str(stale)], check=True, cwd=REPO)
    written = stale.read_text()
    assert written.startswith("# x\n\n") and written.endswith("\n\nafter\n") and "| old |" not in written
    assert error_table_module.markdown() in written
    assert subprocess.run([*command, "--check", str(stale)], cwd=REPO).returncode == 0


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
