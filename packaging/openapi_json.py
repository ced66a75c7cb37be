#!/usr/bin/python3
"""Build step: kktd/openapi.yaml (the one description of the HTTP API, written by hand) -> kktd/openapi.json,
which kktd ships and serves as /v1/openapi.json. Run by the Makefile and debian/rules with Debian's python3 and
python3-yaml, so that kktd needs no YAML parser at run time.

Usage: openapi_json.py SOURCE.yaml TARGET.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import yaml


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 64
    source, target = argv
    with open(source, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    if not isinstance(document, dict) or "paths" not in document:
        print(f"{source}: not an OpenAPI document", file=sys.stderr)
        return 65
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), sort_keys=False)
    # Written whole or not at all: a build interrupted midway must not leave half a description behind.
    directory = os.path.dirname(os.path.abspath(target))
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, delete=False, suffix=".tmp") as out:
        out.write(text)
    os.chmod(out.name, 0o644)  # a temporary file is the owner's only; kktd's service user reads this one
    os.replace(out.name, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
