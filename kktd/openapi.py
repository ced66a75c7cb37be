"""The description of the HTTP API, served as /v1/openapi.json.

It is written by hand as kktd/openapi.yaml and turned into kktd/openapi.json at build time (the Makefile and
debian/rules run packaging/openapi_json.py), so kktd reads JSON and needs no YAML parser at run time.
tests/test_openapi.py checks that the JSON is the YAML's and that both describe the app as it is.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

SPEC_FILE = "openapi.json"


@functools.cache
def spec_json() -> bytes:
    """The description as the JSON bytes answered by GET /v1/openapi.json (read once)."""
    try:
        return resources.files("kktd").joinpath(SPEC_FILE).read_bytes()
    except FileNotFoundError:
        raise RuntimeError(
            f"kktd/{SPEC_FILE} is missing: it is built from kktd/openapi.yaml (`make kktd/openapi.json` in a checkout)"
        ) from None


@functools.cache
def spec() -> dict[str, Any]:
    document = json.loads(spec_json())
    if not isinstance(document, dict) or "paths" not in document:
        raise ValueError(f"kktd/{SPEC_FILE} is not an OpenAPI document")
    return document
