"""Micro-benchmark: what it costs to turn one request body into a validated kktd Receipt, per decoder.

    .venv/bin/python bench/decoders.py [--bodies N] [--repeat R]

Every arm ends in the same kktd Receipt (same canonical JSON and hash; checked before timing) from the same
bodies: bench/dataset.py's realistic receipts (2-5 items, Cyrillic names, 780 bytes on average, as wrk posts
them). Arms:

  before            kktd/receipt.py as it was before issue 15 (commit BEFORE, read with git show): json.loads,
                    the hand-written checks, json.dumps for the canonical JSON
  reference         json.loads + the same hand-written checks (validate_receipt, kktd's error path today;
                    its canonical JSON is msgspec's, byte for byte json.dumps')
  orjson+checks     orjson.loads + the same hand-written checks
  msgspec           kktd.receipt.parse_receipt: msgspec.json decodes into constrained Structs, then the
                    rules no type expresses (sums, totals, text content): kktd since issue 15
  json+msgspec      json.loads + msgspec.convert into the same Structs + the same rules (the shape a
                    json.loads object_pairs_hook, e.g. a duplicate-key check, would need)
  pydantic          pydantic v2 strict models with the same constraints (model_validate_json) + the same rules

and, for scale, the bare parsers (json.loads, orjson.loads, msgspec.json.decode untyped) and the cost of a
refused body on the fast path (typed decode fails, then the reference names the rule). Medians of R runs
over N bodies, in microseconds per body, on one core of this machine (it is shared: run it twice).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import dataset
import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from kktd import receipt as kr
from kktd.receipt import MAX_AMOUNT, MAX_ITEMS, MAX_PAYMENTS, Receipt, parse_receipt, validate_receipt

PAmount = Annotated[StrictInt, Field(ge=0, lt=MAX_AMOUNT)]


class PItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    price: PAmount
    quantity: StrictStr | StrictInt
    vat: kr.VatRate
    payment_method: kr.PaymentMethod
    payment_object: kr.PaymentObject
    sum: PAmount | None = None
    measure: kr.Measure | None = None


class PPayment(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: kr.PaymentType
    amount: PAmount


class PCashier(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    inn: StrictStr | None = None


class PReceipt(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    pos_id: Annotated[StrictStr, Field(min_length=1, max_length=32)]
    operation: kr.Operation
    taxation: kr.Taxation
    items: Annotated[list[PItem], Field(min_length=1, max_length=MAX_ITEMS)]
    payments: Annotated[list[PPayment], Field(min_length=1, max_length=MAX_PAYMENTS)]
    idempotency_key: StrictStr | None = None
    customer_contact: StrictStr | None = None
    cashier: PCashier | None = None


BEFORE = "252b6bf"  # main before issue 15


def module_before() -> ModuleType | None:
    """kktd/receipt.py at BEFORE, imported under another name; None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{BEFORE}:kktd/receipt.py"], capture_output=True, text=True, check=False
    )
    if source.returncode != 0:
        return None
    spec = importlib.util.spec_from_loader("receipt_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["receipt_before"] = module  # dataclasses look their module up while the class is built
    exec(compile(source.stdout, f"{BEFORE}:kktd/receipt.py", "exec"), module.__dict__)
    return module


def reference(body: bytes) -> Receipt:
    return validate_receipt(kr.decode_json(body), None)


def orjson_checks(body: bytes) -> Receipt:
    return validate_receipt(orjson.loads(body), None)


def msgspec_typed(body: bytes) -> Receipt:
    return kr._from_typed(kr._DECODER.decode(body), None)


def json_then_msgspec(body: bytes) -> Receipt:
    return kr._from_typed(msgspec.convert(json.loads(body), kr._ReceiptIn), None)


def strict_then_msgspec(body: bytes) -> Receipt:
    return parse_receipt(body, None)


def pydantic_typed(body: bytes) -> Receipt:
    # The same post-checks read the same attribute names from pydantic's models.
    return kr._from_typed(PReceipt.model_validate_json(body), None)  # type: ignore[arg-type]


ARMS: dict[str, Callable[[bytes], Any]] = {
    "reference": reference,
    "orjson+checks": orjson_checks,
    "msgspec": msgspec_typed,
    "json+msgspec": json_then_msgspec,
    "kktd: decode_json+msgspec": strict_then_msgspec,
    "pydantic": pydantic_typed,
    "json.loads only": json.loads,
    "orjson.loads only": orjson.loads,
    "msgspec.json.decode only": msgspec.json.decode,
}


def bad_body(good: dict[str, Any]) -> bytes:
    bad = json.loads(json.dumps(good))
    bad["items"][0]["sum"] += 1  # item_sum_mismatch: the typed decode passes, a rule refuses
    return json.dumps(bad, ensure_ascii=False).encode()


def refused(body: bytes) -> None:
    try:
        parse_receipt(body, None)
    except kr.ReceiptInvalid:
        return
    raise AssertionError("a bad body was accepted")


def time_per_body(fn: Callable[[bytes], Any], bodies: list[bytes], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for body in bodies:
            fn(body)
        runs.append((time.perf_counter() - started) / len(bodies) * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bodies", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(15)
    receipts = [dataset.receipt(f"dec-{n}", rng) for n in range(args.bodies)]
    bodies = [json.dumps(r, ensure_ascii=False).encode() for r in receipts]
    expected = [reference(body) for body in bodies]
    for name in ("orjson+checks", "msgspec", "json+msgspec", "kktd: decode_json+msgspec", "pydantic"):
        assert [ARMS[name](body) for body in bodies] == expected, name
    print(
        f"{len(bodies)} bodies, {statistics.mean(map(len, bodies)):.0f} bytes on average; "
        f"median of {args.repeat} runs, microseconds per body"
    )
    arms = dict(ARMS)
    old = module_before()
    if old is not None:
        arms = {"before " + BEFORE: lambda body: old.parse_receipt(body, None), **arms}
        got = [arms["before " + BEFORE](body) for body in bodies]
        assert [(r.canonical_json, r.body_hash) for r in got] == [(r.canonical_json, r.body_hash) for r in expected], (
            "before"
        )
    else:
        print("  (not a git checkout: the 'before' arm is skipped)")
    timings = {name: time_per_body(fn, bodies, args.repeat) for name, fn in arms.items()}
    baseline = next(iter(timings.values()))
    for name, per in timings.items():
        print(f"  {name:<26} {per:7.1f} us   {per / baseline:5.2f} x {next(iter(timings))}")
    bad = [bad_body(r) for r in receipts]
    print(
        f"  {'refused body, fast path':<26} {time_per_body(refused, bad, args.repeat):7.1f} us   "
        f"(typed decode, a rule refuses, the reference names it)"
    )


if __name__ == "__main__":
    main()
