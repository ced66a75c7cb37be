"""The table of error codes in docs/api.md, generated from the code: every kktd.errors.ErrorCode with the
statuses it is answered with and its meaning, and every registered upstream's intake codes (a 422).

    python -m kktd.error_table                      # print the table (markdown)
    python -m kktd.error_table --write docs/api.md  # replace the table between the markers in the file
    python -m kktd.error_table --check docs/api.md  # exit 1 if the file's table is not the generated one

tests/test_docs.py fails while docs/api.md's table differs from this one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from kktd.errors import INTAKE_CODE_MEANINGS, ErrorCode
from kktd.upstreams import REGISTRY

BEGIN = "<!-- error-table:begin -->"
END = "<!-- error-table:end -->"
HEADER = ("| status | code | meaning |", "| --- | --- | --- |")
INTAKE_STATUS = 422  # an intake check raises kktd.receipt.ReceiptInvalid, answered as a 422
REGENERATE = "python -m kktd.error_table --write docs/api.md"


@dataclass(frozen=True, order=True)
class Row:
    status: int
    rank: int  # kktd's own codes in the enum's order, then the upstreams' intake codes by name
    code: str
    meaning: str

    def markdown(self) -> str:
        return f"| {self.status} | `{self.code}` | {self.meaning} |"


def intake_codes() -> dict[str, list[str]]:
    """Each registered upstream's own intake code -> the upstreams refusing with it (registry order)."""
    found: dict[str, list[str]] = {}
    for spec in REGISTRY.values():
        for code in sorted(spec.intake_codes):
            found.setdefault(code, []).append(spec.name)
    return found


def rows() -> list[Row]:
    """The table's rows, by status: a code answered with two statuses has a row for each."""
    table = [
        Row(status, rank, code.value, code.meaning) for rank, code in enumerate(ErrorCode) for status in code.statuses
    ]
    own = {code.value for code in ErrorCode}
    for rank, (code, upstreams) in enumerate(sorted(intake_codes().items()), start=len(table)):
        if code in own:
            raise ValueError(f"intake code {code} of {', '.join(upstreams)} is one of kktd's own: leave it out")
        if code not in INTAKE_CODE_MEANINGS:
            raise ValueError(
                f"intake code {code} of {', '.join(upstreams)} has no meaning in kktd.errors.INTAKE_CODE_MEANINGS"
            )
        names = ", ".join(f"`{name}`" for name in upstreams)
        which = "upstream" if len(upstreams) == 1 else "upstreams"
        table.append(Row(INTAKE_STATUS, rank, code, f"{which} {names}: {INTAKE_CODE_MEANINGS[code]}"))
    return sorted(table)


def markdown() -> str:
    """The table as markdown, without the markers."""
    return "\n".join([*HEADER, *(row.markdown() for row in rows())]) + "\n"


def replace_table(text: str) -> str:
    """`text` with what lies between the markers replaced by the generated table."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} in the document")
    return text[: start + len(BEGIN)] + "\n\n" + markdown() + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kktd.error_table", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", type=Path, help="replace the table between the markers")
    group.add_argument("--check", metavar="FILE", type=Path, help="exit 1 if the table there is not this one")
    args = parser.parse_args(argv)
    path: Path | None = args.write or args.check
    if path is None:
        sys.stdout.write(markdown())
        return 0
    text = path.read_text(encoding="utf-8")
    try:
        wanted = replace_table(text)
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 65
    if args.check:
        if wanted != text:
            print(f"{path}: the table of errors is not the generated one; run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if wanted != text:
        path.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
