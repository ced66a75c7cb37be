"""Structure-aware generators of what a hostile client can put in a request body, and the fuzz budget.

A body is drawn as a small JSON syntax tree that can hold what a dict cannot (the same key twice, a number
spelled 1e400 or with 5,000 digits, NaN, lone surrogates, control and bidi characters, 100 KB keys, deep
nesting), rendered with a chosen string escaping and whitespace, then encoded (UTF-8 mostly; also with a BOM,
UTF-16, UTF-32, surrogates passed through as invalid UTF-8) and sometimes cut short or bit-flipped. Half the
bodies start from a valid receipt with one mutation at a random place, so validation is reached deeply, not
only the JSON parser.

Budget: `make test` runs a fixed, derandomized number of cases (a failure reproduces on every run), `make
check` a tenth of them (KKTD_FUZZ_QUICK=1);
`make fuzz` sets KKTD_FUZZ_EXAMPLES and runs randomized: on a failure hypothesis prints the seed, and
`make fuzz KKTD_FUZZ_SEED=N` (pytest --hypothesis-seed) repeats that run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kktd.receipt import sample_receipt

FUZZ_LONG = "KKTD_FUZZ_EXAMPLES" in os.environ
# `make check`, the fast tier: a tenth of each fuzzer's fixed cases (still derandomized, so reproducible).
FUZZ_QUICK = os.environ.get("KKTD_FUZZ_QUICK", "") == "1"


def fuzz_settings(default_examples: int, scaled: bool = True) -> settings:
    """Hypothesis settings: `default_examples` derandomized cases in `make test`; the count from
    KKTD_FUZZ_EXAMPLES, randomized (seeded by --hypothesis-seed), in `make fuzz`."""
    examples = int(os.environ.get("KKTD_FUZZ_EXAMPLES", default_examples)) if scaled else default_examples
    if FUZZ_QUICK and scaled and not FUZZ_LONG:
        examples = max(10, examples // 10)
    return settings(
        max_examples=examples,
        derandomize=not FUZZ_LONG or not scaled,
        deadline=None,  # a timed test is not a test here: speed lives in make bench
        database=None,  # nothing written into the work tree; a failure is reproduced by the seed
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# ---- a JSON syntax tree that can say more than json.dumps ----


@dataclass(frozen=True)
class Obj:
    pairs: tuple[tuple[str, Node], ...]


@dataclass(frozen=True)
class Arr:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Str:
    text: str


@dataclass(frozen=True)
class Raw:
    """A token written as is: a number spelling, true/false/null, NaN, Infinity, or garbage."""

    token: str


Node = Obj | Arr | Str | Raw


def from_python(value: Any) -> Node:
    if isinstance(value, dict):
        return Obj(tuple((k, from_python(v)) for k, v in value.items()))
    if isinstance(value, list):
        return Arr(tuple(from_python(v) for v in value))
    if isinstance(value, str):
        return Str(value)
    return Raw(json.dumps(value))


@dataclass(frozen=True)
class Style:
    ensure_ascii: bool
    space: str


def render(node: Node, style: Style) -> str:
    if isinstance(node, Obj):
        sep = "," + style.space
        inner = sep.join(f"{_string(k, style)}:{style.space}{render(v, style)}" for k, v in node.pairs)
        return "{" + inner + "}"
    if isinstance(node, Arr):
        return "[" + ("," + style.space).join(render(v, style) for v in node.items) + "]"
    if isinstance(node, Str):
        return _string(node.text, style)
    return node.token


def _string(text: str, style: Style) -> str:
    return json.dumps(text, ensure_ascii=style.ensure_ascii)


# ---- leaves a hostile client would try ----

NASTY_CHARS = (
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "\x85",
    "\x9f",
    "\n",
    "\r",
    "\t",
    "\\",
    '"',
    "\u061c",
    "\u200e",
    "\u200f",
    "\u202a",
    "\u202b",
    "\u202c",
    "\u202d",
    "\u202e",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ufffe",
    "\uffff",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\u00a0",
    "\u200b",
    "\u200d",
    "\U0001f600",
    "Я",
    "ё",
    "€",
)
NUMBER_TOKENS = (
    "0",
    "-0",
    "1",
    "-1",
    "8990",
    "24430",
    "999999999999",
    "1000000000000",
    "9" * 19,
    "1" * 33,
    "0.5",
    "8990.0",
    "1e3",
    "1E400",
    "-1e400",
    "1e-400",
    "0.1e-99999",
    "2.5",
    "NaN",
    "Infinity",
    "-Infinity",
    "01",
    "+1",
    ".5",
    "1.",
    "0x10",
    "1_000",
)
KNOWN_KEYS = (
    "idempotency_key",
    "pos_id",
    "operation",
    "taxation",
    "items",
    "payments",
    "customer_contact",
    "cashier",
    "name",
    "price",
    "quantity",
    "sum",
    "vat",
    "payment_method",
    "payment_object",
    "type",
    "amount",
    "inn",
)

nasty_text = st.lists(
    st.one_of(st.sampled_from(NASTY_CHARS), st.text(max_size=4), st.characters(codec=None)),
    max_size=12,
).map("".join)
texts = st.one_of(nasty_text, st.text(max_size=40), st.sampled_from(["", " ", "sale", "vat10", "1.000"]))
keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    texts,
    st.integers(1_000, 100_000).map(lambda n: "k" * n),  # a 100 KB field name
)
leaves: st.SearchStrategy[Node] = st.one_of(
    texts.map(Str),
    st.sampled_from(NUMBER_TOKENS).map(Raw),
    st.integers(-(10**15), 10**15).map(lambda n: Raw(str(n))),
    st.integers(20, 6_000).map(lambda n: Raw("1" * n)),  # past int()'s 4,300-digit limit too
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: Raw(repr(f))),
    st.sampled_from(["true", "false", "null"]).map(Raw),
)


def _containers(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.one_of(
        st.lists(children, max_size=5).map(lambda items: Arr(tuple(items))),
        st.lists(st.tuples(keys, children), max_size=5).map(lambda pairs: Obj(tuple(pairs))),
    )


json_trees: st.SearchStrategy[Node] = st.recursive(leaves, _containers, max_leaves=25)


@st.composite
def deep_nesting(draw: st.DrawFn) -> Node:
    """Arrays and objects nested up to 30,000 deep, written out flat (a tree that deep would exhaust the
    generator's own recursion)."""
    depth = draw(st.sampled_from([10, 100, 900, 1_100, 5_000, 30_000]))
    leaf = render(draw(leaves), Style(ensure_ascii=True, space=""))
    kind = draw(st.sampled_from(["arr", "obj", "mixed"]))
    openers = {"arr": ["["], "obj": ['{"items":'], "mixed": ["[", '{"items":']}[kind]
    opened = [openers[level % len(openers)] for level in range(depth)]
    closers = "".join("]" if o == "[" else "}" for o in reversed(opened))
    return Raw("".join(opened) + leaf + closers)


# ---- mutations of a valid receipt ----


def _paths(node: Node, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, Obj):
        for index, (_, child) in enumerate(node.pairs):
            found += _paths(child, prefix + (index,))
    elif isinstance(node, Arr):
        for index, child in enumerate(node.items):
            found += _paths(child, prefix + (index,))
    return found


def _replace(node: Node, path: tuple[Any, ...], change: Any) -> Node:
    if not path:
        changed: Node = change(node)
        return changed
    head, rest = path[0], path[1:]
    if isinstance(node, Obj):
        pairs = list(node.pairs)
        key, child = pairs[head]
        pairs[head] = (key, _replace(child, rest, change))
        return Obj(tuple(pairs))
    assert isinstance(node, Arr)
    items = list(node.items)
    items[head] = _replace(items[head], rest, change)
    return Arr(tuple(items))


@st.composite
def mutated_receipts(draw: st.DrawFn) -> Node:
    base = sample_receipt(draw(st.sampled_from(["fuzz-1", "fuzz-2"])))
    if draw(st.booleans()):
        base["customer_contact"] = draw(st.sampled_from(["buyer@example.ru", "+79991234567"]))
        base["cashier"] = {"name": "Иванова А.", "inn": "123456789012"}
    tree = from_python(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(tree)))
        kind = draw(st.sampled_from(["value", "text", "duplicate", "unknown", "drop", "wrap"]))
        if kind == "value":
            new = draw(json_trees)
            tree = _replace(tree, path, lambda _node, new=new: new)
        elif kind == "text":
            text = draw(nasty_text)
            tree = _replace(
                tree, path, lambda node, text=text: Str(node.text + text) if isinstance(node, Str) else node
            )
        elif kind in ("duplicate", "unknown", "drop"):
            key = draw(keys)
            value = draw(json_trees)
            tree = _replace(
                tree, path, lambda node, kind=kind, key=key, value=value: _edit_object(node, kind, key, value)
            )
        else:
            tree = _replace(tree, path, lambda node: Arr((node,)))
    return tree


def _edit_object(node: Node, kind: str, key: str, value: Node) -> Node:
    if not isinstance(node, Obj) or not node.pairs:
        return node
    if kind == "duplicate":  # the same key again, with another value: last-wins parsers would take it
        first_key = node.pairs[0][0]
        return Obj(node.pairs + ((first_key, value),))
    if kind == "unknown":
        return Obj(node.pairs + ((key, value),))
    return Obj(node.pairs[1:])


# ---- from a tree to the bytes on the wire ----

ENCODINGS = ("utf-8", "utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le")


@st.composite
def encoded(draw: st.DrawFn, trees: st.SearchStrategy[Node]) -> bytes:
    tree = draw(trees)
    style = Style(ensure_ascii=draw(st.booleans()), space=draw(st.sampled_from(["", " ", "\n", "\t", "\r\n"])))
    text = render(tree, style)
    encoding = draw(st.sampled_from(ENCODINGS))
    # A lone surrogate left raw (ensure_ascii=False) is passed through: invalid UTF-8 on the wire.
    body = text.encode(encoding, "surrogatepass")
    damage = draw(st.sampled_from(["none", "none", "none", "cut", "flip", "append"]))
    if damage == "cut" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif damage == "flip" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    elif damage == "append":
        body += draw(st.binary(max_size=8))
    return body


hostile_bodies: st.SearchStrategy[bytes] = st.one_of(
    encoded(mutated_receipts()),
    encoded(mutated_receipts()),
    encoded(json_trees),
    encoded(deep_nesting()),
    st.binary(max_size=64),
)
header_keys = st.one_of(st.none(), st.just("fuzz-1"), st.text(max_size=70))
