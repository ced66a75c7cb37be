#!/usr/bin/python3
"""Build-time checks of the vendored venv, run by debian/rules (Debian's python3, standard library only).

check-version    the wheel built from the tree has the upstream version debian/changelog names
check-pins       every distribution in the venv but the project is pinned (==) in constraints.txt, at
                 the installed version: a new transitive dependency cannot slip in unpinned
check-copyright  every distribution in the venv has a stanza in debian/copyright
fix-records      recomputes the hashes in each distribution's RECORD after debian/rules rewrote the
                 staging path out of the console scripts (so RECORD matches the files, and two builds in
                 different directories are identical)
cli-module       prints the module of the project's `kktd` console script (for argparse-manpage), so a
                 moved CLI module needs no edit here
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import re
import sys
from importlib import metadata
from pathlib import Path


def normalize(name: str) -> str:
    """PEP 503 normalisation: `typing_extensions`, `Typing-Extensions` and `typing.extensions` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(site: Path) -> dict[str, metadata.Distribution]:
    found = {normalize(dist.metadata["Name"]): dist for dist in metadata.distributions(path=[str(site)])}
    if not found:
        raise SystemExit(f"vendored: no distributions in {site}")
    return found


def read_pins(constraints: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if match := re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line):
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def check_version(args: argparse.Namespace) -> int:
    wheels = sorted(p.name for p in Path(args.wheels).glob("kktd-*.whl"))
    expected = f"kktd-{args.version}-"
    if len(wheels) != 1 or not wheels[0].startswith(expected):
        print(
            f"vendored: debian/changelog's upstream version is {args.version}, but the tree builds "
            f"{wheels or 'no kktd wheel'}: add a debian/changelog entry for the new version",
            file=sys.stderr,
        )
        return 1
    return 0


def check_pins(args: argparse.Namespace) -> int:
    pins = read_pins(Path(args.constraints))
    problems = []
    for name, dist in sorted(distributions(Path(args.site)).items()):
        if name == normalize(args.project):
            continue
        pinned = pins.get(name)
        if pinned != dist.version:
            problems.append(
                f"{dist.metadata['Name']} {dist.version} is installed but constraints.txt pins {pinned or 'nothing'}"
            )
    for problem in problems:
        print(f"vendored: {problem}", file=sys.stderr)
    return 1 if problems else 0


def check_copyright(args: argparse.Namespace) -> int:
    text = Path(args.copyright).read_text()
    # Each vendored distribution's stanza names its dist-info directory: <name>-<version>.dist-info.
    listed = {normalize(m.group(1)) for m in re.finditer(r"site-packages/([A-Za-z0-9._-]+?)-\*\.dist-info", text)}
    installed = {name for name in distributions(Path(args.site)) if name != normalize(args.project)}
    missing = sorted(installed - listed)
    stale = sorted(listed - installed)
    for name in missing:
        print(f"vendored: {name} is vendored but debian/copyright has no stanza for it", file=sys.stderr)
    for name in stale:
        print(f"vendored: debian/copyright lists {name}, which is no longer vendored", file=sys.stderr)
    return 1 if missing or stale else 0


def fix_records(args: argparse.Namespace) -> int:
    site = Path(args.site)
    for dist in distributions(site).values():
        record = next(Path(str(f.locate())) for f in dist.files or [] if f.name == "RECORD")
        rows = list(csv.reader(io.StringIO(record.read_text())))
        for row in rows:
            path, digest = (site / row[0]).resolve(), row[1] if len(row) > 1 else ""
            if digest and path.is_file():
                data = path.read_bytes()
                encoded = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                row[1:3] = [f"sha256={encoded}", str(len(data))]
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        record.write_text(out.getvalue())
    return 0


def cli_module(args: argparse.Namespace) -> int:
    dist = distributions(Path(args.site))[normalize(args.project)]
    scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == args.project]
    if len(scripts) != 1:
        print(f"vendored: {args.project} declares no `{args.project}` console script", file=sys.stderr)
        return 1
    print(scripts[0].module)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    version = commands.add_parser("check-version")
    version.add_argument("--wheels", required=True)
    version.add_argument("--version", required=True)
    pins = commands.add_parser("check-pins")
    pins.add_argument("--site", required=True)
    pins.add_argument("--constraints", required=True)
    pins.add_argument("--project", required=True)
    copyright_ = commands.add_parser("check-copyright")
    copyright_.add_argument("--site", required=True)
    copyright_.add_argument("--copyright", required=True)
    copyright_.add_argument("--project", required=True)
    records = commands.add_parser("fix-records")
    records.add_argument("--site", required=True)
    module = commands.add_parser("cli-module")
    module.add_argument("--site", required=True)
    module.add_argument("--project", required=True)
    args = parser.parse_args()
    handlers = {
        "check-version": check_version,
        "check-pins": check_pins,
        "check-copyright": check_copyright,
        "fix-records": fix_records,
        "cli-module": cli_module,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
