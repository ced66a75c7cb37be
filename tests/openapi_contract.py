"""Checks an answer against kktd/openapi.yaml: the status is documented for the operation, the body is JSON
matching the schema of that status. Used by the contract tests and the live fuzzers."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema_rs

from kktd.openapi import spec

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@dataclass(frozen=True)
class Operation:
    method: str  # upper case
    template: str  # /v1/kkt/receipt/{receipt_id}

    def matches(self, method: str, path: str) -> bool:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(self.template)) + "$"
        return method.upper() == self.method and re.match(pattern, path) is not None


@dataclass
class Contract:
    document: dict[str, Any] = field(default_factory=spec)
    seen: set[tuple[str, str, int]] = field(default_factory=set)
    _validators: dict[str, Any] = field(default_factory=dict)

    def operations(self) -> list[Operation]:
        return [
            Operation(method.upper(), template)
            for template, item in self.document["paths"].items()
            for method in item
            if method in METHODS
        ]

    def operation(self, method: str, path: str) -> Operation:
        found = [op for op in self.operations() if op.matches(method, path)]
        # A literal segment beats a template segment (as in the router): fewest templates first.
        found.sort(key=lambda op: op.template.count("{"))
        assert found, f"{method} {path} is not described in kktd/openapi.yaml"
        return found[0]

    def documented_statuses(self, op: Operation) -> set[int]:
        return {int(code) for code in self.document["paths"][op.template][op.method.lower()]["responses"]}

    def check(self, method: str, path: str, status: int, content_type: str, body: bytes) -> Any:
        """Assert that the answer is described; return the decoded body."""
        op = self.operation(method, path)
        responses = self.document["paths"][op.template][op.method.lower()]["responses"]
        assert str(status) in responses, (
            f"{op.method} {op.template} answered {status}, not documented (documented: {sorted(responses)}): "
            f"{body[:300]!r}"
        )
        response = self._resolve(responses[str(status)])
        media = response.get("content", {})
        media_type = content_type.split(";")[0].strip()
        assert media_type in media, (op, status, content_type)
        self.seen.add((op.method, op.template, status))
        if media_type == "text/plain":
            return body.decode("utf-8")
        if media_type == "application/x-ndjson":  # one receipt view per line
            lines = [json.loads(line) for line in body.splitlines() if line]
            for line in lines:
                self._validate({"$ref": "#/components/schemas/ReceiptView"}, line, op, status)
            return lines
        decoded = json.loads(body)
        self._validate(media["application/json"]["schema"], decoded, op, status)
        return decoded

    def _validate(self, schema: dict[str, Any], decoded: Any, op: Operation, status: int) -> None:
        schema_ref = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(schema_ref)
        if validator is None:
            root = {"$schema": JSON_SCHEMA_DIALECT, "components": self.document["components"], **schema}
            validator = self._validators[schema_ref] = jsonschema_rs.validator_for(root)
        errors = [f"{e.message} at {list(e.instance_path)}" for e in validator.iter_errors(decoded)]
        assert not errors, f"{op.method} {op.template} {status}: {errors[:5]}\n{json.dumps(decoded)[:1000]}"

    def _resolve(self, obj: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in obj:
            target: Any = self.document
            for part in obj["$ref"].lstrip("#/").split("/"):
                target = target[part]
            obj = target
        return obj

    def undocumented_seen(self) -> set[tuple[str, str, int]]:
        return {(m, t, s) for m, t, s in self.seen if s not in self.documented_statuses(Operation(m, t))}

    def never_seen(self) -> set[tuple[str, str, int]]:
        return {
            (op.method, op.template, status) for op in self.operations() for status in self.documented_statuses(op)
        } - self.seen
