"""Attacker-controlled text made safe to echo in a log line or an error answer, and the characters a text
field printed on a fiscal document may not hold.

Escaping happens where the text enters a message (not in the log formatter): the same message goes to the
log and to the client, and neither may carry raw control characters, bidirectional overrides, lone
surrogates (not encodable as UTF-8: the answer itself would fail) or a 100 KB field name.
"""

from __future__ import annotations

import re
import unicodedata

# A few hundred characters say what was wrong; more only fills the log.
DEFAULT_LIMIT = 200

# Characters refused in text fields (names, ids, contacts): they are invisible or reorder what is printed on
# a fiscal document and shown to the buyer, or they break the line they are logged on.
#   C0/C1 controls and DEL; U+2028/U+2029 line and paragraph separators;
#   bidirectional marks, embeddings, overrides and isolates (U+061C, U+200E/U+200F, U+202A–U+202E,
#   U+2066–U+2069); U+FEFF (a byte order mark inside text); lone surrogates (a JSON "\ud800" escape decodes
#   to one: valid JSON, but no character).
FORBIDDEN_TEXT_RE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]"
)


def forbidden_character(text: str) -> str | None:
    """The first character of `text` a text field may not hold, described ("U+202E RIGHT-TO-LEFT OVERRIDE"),
    or None if there is none."""
    match = FORBIDDEN_TEXT_RE.search(text)
    if match is None:
        return None
    return describe_character(match.group())


def describe_character(char: str) -> str:
    name = unicodedata.name(char, "")
    if not name:
        name = "lone surrogate" if "\ud800" <= char <= "\udfff" else unicodedata.category(char)
    return f"U+{ord(char):04X} {name}"


def _escape_char(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _is_plain(char: str) -> bool:
    # isprintable() is False for controls, format characters (every bidi control among them), surrogates,
    # separators other than the space, private-use and unassigned code points.
    return char != "\\" and char.isprintable()


def escape(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """`text` with every non-printable character as a backslash escape (and the backslash itself doubled, so
    an escape cannot be forged), cut to about `limit` characters with the length of what was left out."""
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text  # the common case: a short, plain value
    out: list[str] = []
    used = 0
    for index, char in enumerate(text):
        piece = char if _is_plain(char) else _escape_char(char)
        if used + len(piece) > limit:
            return "".join(out) + f"…[{len(text) - index} more characters]"
        out.append(piece)
        used += len(piece)
    return "".join(out)


def quoted(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """escape() in double quotes (a literal quote inside is escaped too): for values inside a sentence."""
    return '"' + escape(text, limit).replace('"', '\\"') + '"'
