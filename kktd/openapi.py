"""kktd/openapi.yaml, the one description of the HTTP API, loaded once (served as /v1/openapi.json)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import yaml

SPEC_FILE = "openapi.yaml"


@functools.cache
def spec() -> dict[str, Any]:
    text = resources.files("kktd").joinpath(SPEC_FILE).read_text(encoding="utf-8")
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or "paths" not in document:
        raise ValueError(f"kktd/{SPEC_FILE} is not an OpenAPI document")
    return document


@functools.cache
def spec_json() -> bytes:
    """The description as the JSON bytes answered by GET /v1/openapi.json (built once)."""
    return json.dumps(spec(), ensure_ascii=False, separators=(",", ":")).encode()
